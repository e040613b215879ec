"""Headless Chromium for tests: render a local HTML file to a screenshot, dump its DOM after
rendering, and count the images the browser actually decoded. Each call runs Chromium as a
subprocess in its own process group with a throwaway profile, and kills that group when done."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np

TIMEOUT_S = 120
INSTALL_HINT = ("Chromium is not installed: `make test` installs it (apt-get install -y chromium), "
                "or install it yourself and put `chromium` on PATH")

# Appended to a test-only copy of the page (the product page stays script-free): after `load`
# (which waits for every image) record how many <img> decoded to a non-empty bitmap.
_PROBE = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
  document.body.setAttribute("data-images-total", String(imgs.length));
  document.body.setAttribute("data-images-decoded", String(ok.length));
});
</script>
"""


def chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run Chromium; on timeout or after it ends, kill whatever it left in its process group."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "LANG": "C.UTF-8"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        raise RuntimeError(f"chromium timed out after {timeout} s: {' '.join(args[:3])} …\n{err[-2000:]}")
    finally:
        _kill_group(proc.pid)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _flags(profile: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}"]


def render(html_path: Path, png_path: Path, width: int = 1400, height: int = 3000) -> dict:
    """Screenshot `html_path` into `png_path` (width×height viewport) and dump the DOM of a probed
    copy after load. Returns {"dom", "images_total", "images_decoded", "screenshot"}."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError(INSTALL_HINT)
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="kd-chromium-") as tmp:
        tmp = Path(tmp)
        shot = _run([exe, *_flags(tmp / "profile-shot"), f"--screenshot={png_path}",
                     f"--window-size={width},{height}", html_path.as_uri()])
        if not png_path.is_file():
            raise RuntimeError(f"chromium wrote no screenshot (rc {shot.returncode}): {shot.stderr[-2000:]}")

        text = html_path.read_text(encoding="utf-8")
        probed = text.replace("</body>", _PROBE + "</body>") if "</body>" in text else text + _PROBE
        probe_page = tmp / "probe.html"
        probe_page.write_text(probed, encoding="utf-8")
        dump = _run([exe, *_flags(tmp / "profile-dom"), "--virtual-time-budget=10000",
                     f"--window-size={width},{height}", "--dump-dom", probe_page.as_uri()])
    dom = dump.stdout
    if "<html" not in dom.lower():
        raise RuntimeError(f"chromium dumped no DOM (rc {dump.returncode}): {dump.stderr[-2000:]}")
    total = re.search(r'data-images-total="(\d+)"', dom)
    decoded = re.search(r'data-images-decoded="(\d+)"', dom)
    if not (total and decoded):
        raise RuntimeError("the image probe did not run (no data-images-* on <body> in the dumped DOM)")
    return {"dom": dom, "images_total": int(total.group(1)), "images_decoded": int(decoded.group(1)),
            "screenshot": png_path}


def _pixels(png_path: Path) -> np.ndarray:
    """The image as uint8 (H, W, 3)."""
    try:
        from PIL import Image

        with Image.open(png_path) as im:
            return np.asarray(im.convert("RGB"))
    except ImportError:
        import matplotlib.image as mpimg

        a = mpimg.imread(str(png_path))  # float in [0, 1] for PNGs
        a = (a[..., :3] * 255).round().astype(np.uint8) if a.dtype != np.uint8 else a[..., :3]
        return a


def not_blank(png_path: Path) -> float:
    """Fraction of pixels whose colour differs from the most common one (the background)."""
    a = _pixels(Path(png_path)).astype(np.uint32)
    packed = (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
    values, counts = np.unique(packed.ravel(), return_counts=True)
    return 1.0 - counts.max() / packed.size
