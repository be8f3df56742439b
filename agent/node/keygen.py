"""Private keys and their CSRs, made in a short-lived child process.

Making an EC key and a CSR needs an X.509 library (cryptography); everything else the agent
does with certificates is reading them (`agent/certread.py`). A library once imported stays
for the life of the process: cryptography's would be 11 MiB of every node's agent, used a few
times a day. So each batch (the workloads a snapshot adds, the renewals that fall due, a
join) is one child running `main` below, about 0.1 s; the key travels back over a pipe and
is written by the agent with mode 0600, as before. The control plane checks every CSR.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from ..errors import DabbaError

TIMEOUT = 30.0  # s for one batch (0.1 s plus about 1 ms a key here)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# -I: no environment variable or user site changes what the child imports or runs
_CMD = [
    sys.executable,
    "-I",
    "-c",
    f"import sys; sys.path.insert(0, {_ROOT!r}); from agent.node.keygen import main; main()",
]


async def csrs(uris: list[str], timeout: float = TIMEOUT) -> list[tuple[bytes, bytes]]:
    """A new private key (PEM, PKCS#8) and a CSR for it naming each URI, in order."""
    if not uris:
        return []
    proc = await asyncio.create_subprocess_exec(
        *_CMD,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(uris).encode()), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DabbaError(f"making {len(uris)} key(s) took longer than {timeout:.0f} s") from None
    what = f"making {len(uris)} key(s) and CSR(s) in a child process ({sys.executable})"
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no error output"]
        raise DabbaError(f"{what} failed (exit {proc.returncode}): {tail[0]}")
    try:
        doc = json.loads(out)
        if not isinstance(doc, list):
            raise TypeError
        pairs = [(d["key"].encode(), d["csr"].encode()) for d in doc]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DabbaError(f"{what}: its answer is not the expected JSON") from None
    if len(pairs) != len(uris):
        raise DabbaError(f"{what}: {len(pairs)} answered for {len(uris)} asked")
    return pairs


def main() -> None:
    """The child: a JSON list of URIs on stdin, a JSON list of {key, csr} PEMs on stdout."""
    from ..control import ca as camod

    out = []
    for uri in json.load(sys.stdin):
        key = camod.new_key()
        out.append({"key": camod.key_pem(key).decode(), "csr": camod.make_csr(key, uri).decode()})
    json.dump(out, sys.stdout)
