"""HTTP downloads that never leave a half file: stream to a temporary name, check, rename; retry with backoff."""
import threading
import time
from pathlib import Path

from train.paths import atomic_write


class DownloadError(Exception):
    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


def fetch(url: str, path: Path, is_complete, what: str, timeout: float = 30.0) -> None:
    """One attempt: stream url into a temporary file next to path, check it with is_complete(tmp_path), rename
    it into place. Any failure is a DownloadError (retry=False where trying again cannot help)."""

    try:
        _stream(url, path, is_complete, what, timeout)
    except OSError as e:  # the local file (requests' own errors are DownloadErrors by now): retrying cannot help
        raise DownloadError(f"cannot write {path}: {e.strerror or e}", retry=False) from None


def _stream(url: str, path: Path, is_complete, what: str, timeout: float) -> None:
    import requests

    answered, written, expected = False, 0, None
    with atomic_write(path) as f:
        try:
            with requests.get(url, stream=True, timeout=timeout) as r:
                if r.status_code == 404:
                    raise DownloadError(f"{url} does not exist (HTTP 404)", retry=False)
                if r.status_code != 200:
                    raise DownloadError(f"HTTP {r.status_code} from {url}")
                answered = True
                if "Content-Encoding" not in r.headers:  # otherwise the length is that of the compressed body
                    expected = r.headers.get("Content-Length")
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    written += len(chunk)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            if not answered and isinstance(e, requests.ConnectionError):
                raise DownloadError(f"cannot connect to {url} (offline?)") from None
            raise DownloadError(f"the transfer of {url} broke off before the end") from None
        except requests.Timeout:
            raise DownloadError(f"timed out fetching {url}") from None
        except requests.RequestException as e:
            raise DownloadError(f"the transfer of {url} failed ({type(e).__name__})") from None
        if expected is not None and written != int(expected):
            raise DownloadError(f"the transfer of {url} was cut short ({written} of {expected} bytes)")
        f.flush()
        if not is_complete(Path(f.name)):
            raise DownloadError(f"{url} is not a complete {what}")


def fetch_with_retries(url: str, path: Path, is_complete, what: str, retries: int, backoff: float,
                       timeout: float = 30.0, stop: threading.Event | None = None) -> None:
    """fetch() up to `retries` times, waiting backoff * 2^k seconds between attempts (a 404 is not retried);
    returns early once `stop` is set. The last failure is raised, with the number of attempts."""
    for attempt in range(1, retries + 1):
        if stop is not None and stop.is_set():
            return
        try:
            fetch(url, path, is_complete, what, timeout)
            return
        except DownloadError as e:
            if not e.retry or attempt == retries:
                raise DownloadError(f"{e} (after {attempt} attempt{'s' if attempt > 1 else ''})", retry=False) from None
            time.sleep(backoff * 2 ** (attempt - 1))
