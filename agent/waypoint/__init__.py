"""Waypoints: upstream Envoy serving the L7 of the services that opt in (istio.io/use-waypoint),
configured by the control plane over ADS and supervised by `dabba waypoint run` (run.py)."""
