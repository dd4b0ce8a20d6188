"""Load on ``fewshot-edge serve``, loopback only and bounded: C concurrent clients each post R single
105x105 PNG glyphs to ``/predict`` over one keep-alive connection; reports requests/s, p50/p99 latency and
errors, side by side with the in-process loop (``FewShotModel.predict`` on one decoded PNG at a time,
the same C x R images, one thread). Target: no errors, and the server at least half the in-process rate.

    nice -n 10 python benchmarks/serve_load.py                       # 8 clients x 50 requests
    nice -n 10 python benchmarks/serve_load.py --clients 8 --requests 200 --json load.json

The shipped Omniglot bundle and a store in a temporary folder with 5 classes of 3 drawn glyphs each,
enrolled over HTTP. Client and server share the machine's cores, as the in-process loop does not.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from fewshot_edge import glyphs
from fewshot_edge.runtime import FewShotModel
from fewshot_edge.runtime.pretrained import default_bundle
from fewshot_edge.serve.process import serving

CLASSES, SHOTS, QUERIES = 5, 3, 16


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def multipart(fields: dict[str, str], images: list[bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    for i, data in enumerate(images):
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
        parts.append(f"{head}Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(conn: http.client.HTTPConnection, path: str, body: bytes, kind: str) -> tuple[int, bytes]:
    conn.request("POST", path, body, {"Content-Type": kind})
    answer = conn.getresponse()
    return answer.status, answer.read()


def client(url: str, bodies: list[tuple[bytes, str]], start: threading.Barrier, out: dict[str, list]) -> None:
    """One client: its requests in turn on one keep-alive connection, latencies and failures recorded."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    start.wait()
    for body, kind in bodies:
        began = time.perf_counter()
        try:
            status, _ = post(conn, "/predict", body, kind)
        except (OSError, http.client.HTTPException) as exc:
            out["errors"].append(exc.__class__.__name__)
            conn.close()
            conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
            continue
        out["latency"].append(time.perf_counter() - began)
        if status != 200:
            out["errors"].append(str(status))
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()

    symbols = [glyphs.draw(seed) for seed in range(CLASSES)]
    shots = {f"class-{c}": [png(glyphs.perturb(s, hand)) for hand in range(SHOTS)] for c, s in enumerate(symbols)}
    queries = [png(glyphs.perturb(symbols[q % CLASSES], 100 + q)) for q in range(QUERIES)]
    total = args.clients * args.requests
    order = [queries[i % QUERIES] for i in range(total)]

    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "device.db"
        with serving(store, log=Path(folder) / "server.log") as url:
            where = urlsplit(url)
            setup = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
            for label, images in shots.items():
                status, said = post(setup, "/classes", *multipart({"label": label}, images))
                assert status == 201, said
            for query in queries:  # warm-up
                status, said = post(setup, "/predict", *multipart({}, [query]))
                assert status == 200, said
            setup.close()

            bodies = [multipart({}, [image]) for image in order]
            results = [{"latency": [], "errors": []} for _ in range(args.clients)]
            start = threading.Barrier(args.clients + 1)
            threads = [
                threading.Thread(target=client, args=(url, bodies[c :: args.clients], start, results[c]))
                for c in range(args.clients)
            ]
            for t in threads:
                t.start()
            start.wait()
            began = time.perf_counter()
            for t in threads:
                t.join()
            server_s = time.perf_counter() - began

        with FewShotModel.open(default_bundle(), store=store, create=False) as model:
            for query in queries:  # warm-up, as the server had
                model.predict(Image.open(io.BytesIO(query)))
            began = time.perf_counter()
            for image in order:
                model.predict(Image.open(io.BytesIO(image)))
            loop_s = time.perf_counter() - began

    latency = np.array([x for r in results for x in r["latency"]]) * 1000
    errors = [e for r in results for e in r["errors"]]
    figures = {
        "clients": args.clients,
        "requests": total,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "server_requests_per_s": total / server_s,
        "p50_ms": float(np.percentile(latency, 50)),
        "p99_ms": float(np.percentile(latency, 99)),
        "in_process_predictions_per_s": total / loop_s,
        "ratio": (total / server_s) / (total / loop_s),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    print(f"{args.clients} clients x {args.requests} requests ({total} single 105x105 PNGs), loopback")
    print(
        f"  server      {figures['server_requests_per_s']:8.1f} requests/s   p50 {figures['p50_ms']:.1f} ms"
        f"   p99 {figures['p99_ms']:.1f} ms   errors {len(errors)}"
    )
    print(f"  in-process  {figures['in_process_predictions_per_s']:8.1f} predictions/s (one thread, decode + predict)")
    print(f"  server / in-process: {figures['ratio']:.2f} (target >= 0.5, and 0 errors)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
