"""Regenerate docs/dashboard.png: ``python docs/dashboard_png.py`` from the repository's root.

Runs the demo on a server of its own in a temporary folder, creates tenants of all four
isolation models, sends a minute of traffic in bursts (so that the sparklines move and some
checkouts wait), and screenshots the dashboard in headless Chromium while the traffic goes on.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from _demo import DemoProcess  # noqa: E402

TENANTS = {
    "acme": "rls",
    "globex": "rls",
    "umbrella": "rls",
    "initech": "schema",
    "stark": "schema",
    "hooli": "role",
    "wayne": "role",
    "wonka": "database",
    "cyberdyne": "database",
}


async def load(url: str, seconds: float, workers: int = 40) -> None:
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < end:
                headers = {"X-Tenant-ID": rng.choice(list(TENANTS))}
                try:
                    if rng.random() < 0.3:
                        await client.post("/notes", headers=headers, json={"body": "hello"})
                    else:
                        await client.get("/notes", headers=headers)
                except httpx.TransportError:
                    pass
                # Full speed for 6 s in every 20, then gentler: the lines rise and fall.
                await asyncio.sleep(0.0 if time.monotonic() % 20 < 6 else 0.05)

        await asyncio.gather(*(worker(i) for i in range(workers)))


def main() -> None:
    with tempfile.TemporaryDirectory() as data:
        Path(data).chmod(0o755)
        env = {
            "DATABASE_URL": "",
            "DEMO_DATA_DIR": f"{data}/demo-data",
            "MAX_CONNECTIONS": "10",
            "LOG_LEVEL": "warning",
        }
        with DemoProcess(env) as demo:
            for tenant, isolation in TENANTS.items():
                body = {"id": tenant, "isolation": isolation}
                httpx.post(f"{demo.base_url}/tenants", json=body, timeout=60)
            asyncio.run(load(demo.base_url, 62))
            more = threading.Thread(target=lambda: asyncio.run(load(demo.base_url, 8)))
            more.start()
            time.sleep(3)
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run(
                    [
                        "chromium",
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--hide-scrollbars",
                        f"--user-data-dir={profile}",
                        "--virtual-time-budget=2000",
                        "--window-size=1280,800",
                        f"--screenshot={ROOT / 'docs' / 'dashboard.png'}",
                        f"{demo.base_url}/",
                    ],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
            more.join()


if __name__ == "__main__":
    main()
