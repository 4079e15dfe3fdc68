"""Open a page in headless Chromium (Debian's `chromium`): screenshot, count loaded images, collect errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
# Injected into a copy of the page: the title reports loaded images and script/resource errors.
PROBE = (
    "<script>window.__errs=0;window.addEventListener('error',function(){window.__errs++},true);"
    "window.addEventListener('load',function(){var a=Array.prototype.slice.call(document.images);"
    "var ok=a.filter(function(i){return i.complete&&i.naturalWidth>0}).length;"
    "document.title='sdtune-check images='+ok+'/'+a.length+' errors='+window.__errs;});</script>"
)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(dir=tmp, prefix="chromium-profile-")
    return subprocess.run(
        [chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def check_page(page: Path, tmp: Path, size: str = "1400,1600") -> dict:
    """Screenshot ``page`` and load a probed copy; returns images loaded/total, errors, console lines, png."""
    probed = tmp / f"probed-{page.name}.html"
    probed.write_text(
        page.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1), encoding="utf-8"
    )
    dom = _run(
        ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()], tmp
    )
    title = re.search(r"<title>sdtune-check images=(\d+)/(\d+) errors=(\d+)</title>", dom.stdout)
    assert title, f"probe did not run: {dom.stdout[:300]} {dom.stderr[-2000:]}"
    console = [
        line
        for line in dom.stderr.splitlines()
        if "CONSOLE" in line or "Uncaught" in line or "Failed to load resource" in line or "net::ERR" in line
    ]
    shot = tmp / f"{page.stem}.png"
    done = _run([f"--screenshot={shot}", f"--window-size={size}", page.as_uri()], tmp)
    assert shot.is_file(), done.stderr[-2000:]
    return {
        "loaded": int(title[1]),
        "images": int(title[2]),
        "errors": int(title[3]),
        "console": console,
        "screenshot": shot,
    }


def assert_renders(page: Path, tmp: Path, min_images: int) -> dict:
    """Every image decoded, no errors, no external references, a non-blank screenshot."""
    from PIL import Image, ImageStat

    text = page.read_text(encoding="utf-8")
    external = re.findall(r"""(?:src|href)\s*=\s*['"]?(?:https?:)?//""", text)
    assert not external, f"external references: {external[:3]}"
    result = check_page(page, tmp)
    assert result["images"] >= min_images, result
    assert result["loaded"] == result["images"], result
    assert result["errors"] == 0 and not result["console"], result
    with Image.open(result["screenshot"]) as img:
        assert img.size == (1400, 1600)
        assert max(ImageStat.Stat(img.convert("L")).stddev) > 5  # not a blank page
    return result
