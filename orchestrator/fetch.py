"""`up2you-budget weights fetch`: download exactly the files the stages read, and prove they are the right ones.

Hugging Face files go through huggingface_hub one file at a time (never a whole repo): its resolve
URL, metadata request and HTTP download with its own progress bar, retries and Range resume;
`HF_ENDPOINT`/`HF_TOKEN` honoured. An interrupted download waits in `<dir>/.partial/` and the next
fetch resumes it. DINOv2 comes
from its public URL through torch.hub's `download_url_to_file` in a child process
(`python -m up2you.download`), so this process never imports torch.

Every file is then checked against `up2you.checkpoints.EXPECTED`; a file that already verifies is
not even asked about, so a second fetch is a no-op without network. Files under the SMPL-X licence
are fetched only with `accept_licence`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from orchestrator.weightfiles import REFETCH, Verification, verify_file
from up2you.checkpoints import DOWNLOADS, EXPECTED, LICENCES, Download, Expected


@dataclass(frozen=True)
class FetchFile:
    """One file to fetch: from a repo (`repo`, `repo_path`) or a URL, to `<dest>/<local>`."""

    key: str
    local: str  # relative to the weights folder
    licence: str
    repo: str = ""
    revision: str | None = None
    repo_path: str = ""
    local_dir: str = ""  # hf_hub_download's local_dir, relative to the weights folder
    url: str = ""
    expected: Expected | None = None


@dataclass
class FetchResult:
    verified: list[Verification] = field(default_factory=list)  # already there and right, or fetched and right
    fetched: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one line each: the file, what is wrong, the fix
    not_accepted: list[FetchFile] = field(default_factory=list)  # licence not accepted: left out

    @property
    def ok(self) -> bool:
        return not self.failed


def fetch_files(downloads: Iterable[Download], expected: dict[str, Expected] | None = None) -> list[FetchFile]:
    """The registry's downloads as single files, each with what it must verify to."""
    expected = EXPECTED if expected is None else expected
    out = []
    for d in downloads:
        if d.url:
            from up2you.checkpoints import CHECKPOINTS

            rel = CHECKPOINTS[d.key].path
            out.append(FetchFile(d.key, rel, d.licence, url=d.url, expected=expected.get(rel)))
            continue
        for f in d.files:
            rel = f"{d.local_dir}/{f}" if d.local_dir else f
            out.append(FetchFile(d.key, rel, d.licence, d.repo, d.revision, f, d.local_dir, expected=expected.get(rel)))
    return out


def select(keys: Iterable[str] | None) -> list[Download]:
    """`--only KEY...` (none = everything); an unknown key is a usage error naming the known ones."""
    keys = list(keys or [])
    unknown = [k for k in keys if k not in DOWNLOADS]
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)}: unknown checkpoint; known: {', '.join(DOWNLOADS)}")
    return [DOWNLOADS[k] for k in keys] if keys else list(DOWNLOADS.values())


def fetch(dest: Path, files: list[FetchFile], accept_licence: bool, console: Console) -> FetchResult:
    """Fetch what is missing or wrong under `dest`, verify everything; see the module docstring."""
    result = FetchResult()
    for f in files:
        target = dest / f.local
        if target.is_file():
            v = verify_file(target, f.expected, REFETCH, hash_unknown=True)
            if v.ok:
                result.verified.append(v)
                continue
            console.print(f"[yellow]{v.problem}[/yellow]: fetching it again", highlight=False)
        if LICENCES[f.licence].needs_acceptance and not accept_licence:
            result.not_accepted.append(f)
            continue
        error = _download(dest, f)
        if error:
            result.failed.append(f"{target}: {error}")
            continue
        v = verify_file(target, f.expected, "the source now serves a different file; remove it, and report this "
                        "at the project's issues if a fresh fetch gives the same", hash_unknown=True)  # fmt: skip
        if v.ok:
            result.fetched.append(f.local)
            result.verified.append(v)
        else:
            _discard(dest, f)
            result.failed.append(v.problem + " (the downloaded file was removed)")
    return result


def _download(dest: Path, f: FetchFile) -> str:
    """Fetch one file; '' on success, else why (one line) and how to go on."""
    if f.url:
        return _download_url(f.url, dest / f.local, f.expected.sha256 if f.expected else None)
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        _download_hub_file(dest, f)
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (f"download of {f.repo}/{f.repo_path} failed ({first}); check the network (or HF_ENDPOINT/HF_TOKEN) "
                "and run `up2you-budget weights fetch` again: it resumes")  # fmt: skip
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"download of {f.repo}/{f.repo_path} stopped ({first}); run `up2you-budget weights fetch` again: it resumes"
    return ""


def partial_path(dest: Path, f: FetchFile) -> Path:
    """Where an unfinished download waits to be resumed (beside the weights, never where a stage looks)."""
    return dest / ".partial" / (f.local + ".part")


def _download_hub_file(dest: Path, f: FetchFile) -> None:
    """huggingface_hub's own resolve, metadata and HTTP download, into a partial file kept across runs.

    `hf_hub_download` (2.x) deletes its temporary file when a download fails, so an interrupted 700 MB
    file would start over; its `http_get` resumes from any offset, so we keep the partial file
    ourselves (with the ETag it belongs to) and hand it back on the next run.
    """
    import os

    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    endpoint = os.environ.get("HF_ENDPOINT")  # read now: huggingface_hub reads it once, at import
    url = hf_hub_url(f.repo, f.repo_path, revision=f.revision, endpoint=endpoint)
    meta = get_hf_file_metadata(url, endpoint=endpoint)
    part = partial_path(dest, f)
    part.parent.mkdir(parents=True, exist_ok=True)
    tag = part.with_name(part.name + ".etag")
    if not tag.is_file() or tag.read_text() != str(meta.etag):  # another version of the file: start over
        part.unlink(missing_ok=True)
        tag.write_text(str(meta.etag))
    with open(part, "ab") as fh:
        http_get(meta.location, fh, resume_size=fh.tell(), headers=build_hf_headers(), expected_size=meta.size,
                 displayed_filename=Path(f.repo_path).name)  # fmt: skip
    target = dest / f.local
    target.parent.mkdir(parents=True, exist_ok=True)
    part.replace(target)
    tag.unlink(missing_ok=True)


def _download_url(url: str, target: Path, sha256: str | None) -> str:
    """torch.hub's downloader (and its hash check, where a hash is known) in a child process.

    It shows its own progress bar on stderr.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "up2you.download", url, str(target)] + ([sha256] if sha256 else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0:
        why = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        return f"download of {url} failed ({why}); check the network and run `up2you-budget weights fetch` again"
    return ""


def _discard(dest: Path, f: FetchFile) -> None:
    """Remove a wrong download, so the next fetch downloads it again."""
    (dest / f.local).unlink(missing_ok=True)
    partial_path(dest, f).unlink(missing_ok=True)


def licence_notice(files: list[FetchFile]) -> str:
    """What to say about files left out because their licence was not accepted."""
    names = sorted({LICENCES[f.licence].name for f in files})
    urls = sorted({LICENCES[f.licence].url for f in files})
    listed = ", ".join(f.local for f in files)
    return (f"not fetched ({listed}): they are under the {'; '.join(names)}. Read it at {', '.join(urls)}; "
            "if you accept it, run again with --accept-smplx-license")
