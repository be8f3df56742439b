/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Compile-time configuration of the dabbawala programs.
 *
 * Every knob is declared here once, with its default; the loader
 * (agent/bpf/loader.py) passes overrides as -D flags. Runtime settings
 * (the tunnel's address, exclusions, enrolled workloads) live in maps.
 */
#ifndef DABBA_CONFIG_H
#define DABBA_CONFIG_H

/* Folder (with trailing slash) where every map is pinned; one per node. */
#ifndef DABBA_PIN_MAPS
#define DABBA_PIN_MAPS "/sys/fs/bpf/dabba/default/maps/"
#endif

/* Enrolled workloads (one entry per workload cgroup). */
#ifndef DABBA_WL_MAX
#define DABBA_WL_MAX 4096
#endif

/* Captured connections between connect() and ESTABLISHED. */
#ifndef DABBA_CAP_MAX
#define DABBA_CAP_MAX 16384
#endif

/* Live flows of enrolled workloads. */
#ifndef DABBA_FLOW_MAX
#define DABBA_FLOW_MAX 65536
#endif

/* Closed-flow ring buffer, in pages (a power of two). */
#ifndef DABBA_RING_PAGES
#define DABBA_RING_PAGES 256
#endif

/* Capture exclusions: destination CIDRs and destination ports. */
#ifndef DABBA_EXCL_MAX
#define DABBA_EXCL_MAX 256
#endif

/* Addresses a STRICT workload accepts connections from (node tunnels). */
#ifndef DABBA_TUN_ADDR_MAX
#define DABBA_TUN_ADDR_MAX 256
#endif

/* Same-node verdicts (dabba_verdicts), every generation in flight. */
#ifndef DABBA_VERDICT_MAX
#define DABBA_VERDICT_MAX 65536
#endif

/* Services' ports in the kernel (dabba_svc), and endpoint slots of every set in flight. */
#ifndef DABBA_SVC_MAX
#define DABBA_SVC_MAX 4096
#endif
#ifndef DABBA_SVC_EP_SLOTS
#define DABBA_SVC_EP_SLOTS 65536
#endif

#endif /* DABBA_CONFIG_H */
