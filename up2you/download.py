"""`python -m up2you.download URL DEST [SHA256]`: one file through torch.hub's own downloader.

Run as a child of `weights fetch` so that the orchestrator process never imports torch. The
download goes to a temporary name beside DEST and is renamed when complete (torch.hub's behaviour),
so an interrupted download never leaves a partial DEST. With SHA256, torch.hub checks the hash.
Exit 0 ok, 1 failed (the last stdout line says why).
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from torch.hub import download_url_to_file

    url, dest = argv[0], argv[1]
    sha256 = argv[2] if len(argv) > 2 else None
    try:
        download_url_to_file(url, dest, hash_prefix=sha256, progress=True)
    except Exception as exc:  # noqa: BLE001 - reported as one line to the parent
        print(f"{type(exc).__name__}: {exc}".splitlines()[0])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
