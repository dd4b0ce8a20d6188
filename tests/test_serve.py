"""``fewshot-edge serve``: every endpoint and error status against a real uvicorn process on loopback,
the same store as the CLI's both ways, concurrent requests, and the refusal to bind beyond loopback
without a key. The shipped Omniglot bundle, a store in a temporary folder, glyphs drawn by the test."""

from __future__ import annotations

import base64
import io
import json
import socket
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fewshot_edge import glyphs
from fewshot_edge.cli import main
from fewshot_edge.cli.serve import is_loopback
from fewshot_edge.runtime import FewShotModel, open_bundle, to_pixels
from fewshot_edge.runtime.pretrained import default_bundle
from fewshot_edge.serve.process import serving

LIMITS = ["--max-request-mb", "1", "--max-images", "4", "--max-image-pixels", str(200 * 200)]
GLYPHS = {name: glyphs.draw(seed) for seed, name in enumerate(["alpha", "beta", "gamma", "delta"])}


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def drawing(name: str, hand: int) -> bytes:
    """Another hand's drawing of glyph ``name``, as a 105x105 PNG file."""
    return png(glyphs.perturb(GLYPHS[name], hand))


def files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def cli(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    """A one-line JSON error with ``status`` naming ``words``, and no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "\n" not in response.text and "Traceback" not in response.text
    body = response.json()
    assert list(body) == ["error"], body
    for word in words:
        assert word in body["error"], body


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    store = folder / "device.db"
    with serving(store, LIMITS, log=folder / "server.log") as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, store


@pytest.fixture
def client(server):
    """The module's server with no classes enrolled."""
    client, _ = server
    for entry in client.get("/classes").json()["classes"]:
        assert client.delete(f"/classes/{entry['label']}").status_code == 200
    return client


@pytest.fixture
def store(server) -> Path:
    return server[1]


def test_health_info_and_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert Path(info["bundle"]) == default_bundle()
    assert (info["mode"], info["precision"], info["backend"], info["auth"]) == ("prototype", "fp32", "cpu", False)
    assert info["input"] == {"channels": 1, "height": 28, "width": 28}
    assert info["limits"] == {"max_request_bytes": 1024 * 1024, "max_images": 4, "max_image_pixels": 200 * 200}
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/health",
        "/info",
        "/classes",
        "/classes/{label}",
        "/classes/{label}/thumbnail",
        "/classes/{label}/shots",
        "/predict",
    }
    assert set(schema["paths"]["/classes"]["post"]["requestBody"]["content"]) == {
        "multipart/form-data",
        "application/json",
    }


def test_enroll_list_thumbnail_rename_remove(client):
    shots = [drawing("alpha", hand) for hand in range(3)]
    answer = client.post("/classes", data={"label": "  alpha "}, files=files(*shots))
    assert answer.status_code == 201 and answer.json() == {"label": "alpha", "shots": 3}
    assert client.get("/classes").json() == {"classes": [{"label": "alpha", "shots": 3}]}
    assert client.get("/classes/alpha").json() == {"label": "alpha", "shots": 3}

    # the first shot as the model sees it (28x28), with the bundle's inversion undone
    thumb = client.get("/classes/alpha/thumbnail")
    assert thumb.headers["content-type"] == "image/png"
    spec = open_bundle(default_bundle()).manifest.input_spec
    expected = 255 - to_pixels(Image.open(io.BytesIO(shots[0])), spec)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(thumb.content))), expected)

    assert client.patch("/classes/alpha", json={"label": "first"}).json() == {"label": "first", "shots": 3}
    assert client.delete("/classes/first").json() == {"removed": "first", "shots": 3}
    assert client.get("/classes").json() == {"classes": []}


def test_json_enroll_and_add_shots_skip_what_the_class_holds(client):
    encoded = [base64.b64encode(drawing("beta", hand)).decode() for hand in range(3)]
    answer = client.post("/classes", json={"label": "beta", "images": encoded[:2]})
    assert answer.status_code == 201 and answer.json()["shots"] == 2
    added = client.post("/classes/beta/shots", json={"images": [f"data:image/png;base64,{encoded[2]}", encoded[0]]})
    assert added.json() == {"label": "beta", "shots": 3, "added": 1, "skipped": [1]}
    more = client.post("/classes/beta/shots", files=files(drawing("beta", 7)))
    assert more.json()["shots"] == 4


def test_predict_matches_the_model_in_process(client, store):
    for name in ("alpha", "beta", "gamma"):
        client.post("/classes", data={"label": name}, files=files(drawing(name, 0), drawing(name, 1)))
    queries = [drawing("gamma", 5), drawing("alpha", 6), png(np.full((105, 105), 255, np.uint8))]
    answer = client.post("/predict", data={"top_k": "2"}, files=files(*queries)).json()["predictions"]
    by_json = client.post("/predict", json={"images": [base64.b64encode(q).decode() for q in queries]})
    assert [p["label"] for p in by_json.json()["predictions"]] == [p["label"] for p in answer]

    with FewShotModel.open(default_bundle(), store=store, create=False) as model:
        expected = model.predict([Image.open(io.BytesIO(q)) for q in queries], top_k=3)
        labels = model.labels
        proba = model.predict_proba([Image.open(io.BytesIO(q)) for q in queries])
    assert [p["label"] for p in answer][:2] == ["gamma", "alpha"]
    for got, want, row in zip(answer, expected, proba, strict=True):
        assert (got["label"], got["unknown"]) == (want.label, want.label != want.top_k[0][0])
        assert got["distance"] == pytest.approx(want.distance, rel=1e-6)
        assert [t["label"] for t in got["top_k"]] == [label for label, _ in want.top_k[:2]]
        assert got["probabilities"] == pytest.approx(dict(zip(labels, row.tolist(), strict=True)), abs=1e-6)
        assert sum(got["probabilities"].values()) == pytest.approx(1.0)
        assert got["entropy"] == pytest.approx(want.entropy, abs=1e-6) and got["epistemic"] is None  # one model


def test_error_statuses_are_one_line_json(client):
    good = drawing("alpha", 0)
    client.post("/classes", data={"label": "alpha"}, files=files(good))
    # 400: bad image, bad label, no images, bad top_k, bad JSON, wrong body type, no classes to rename to
    assert_error(client.post("/classes", data={"label": "x"}, files=files(b"not an image")), 400, "0.png")
    assert_error(client.post("/classes", data={"label": "unknown"}, files=files(good)), 400, "reserved")
    assert_error(client.post("/classes", data={"label": "a/b"}, files=files(good)), 400, "'/'")
    assert_error(client.post("/classes", files=files(good)), 400, "label")
    assert_error(client.post("/classes", data={"label": "x"}), 400, "no images")
    assert_error(client.post("/predict", data={"top_k": "0"}, files=files(good)), 400, "top_k")
    assert_error(client.post("/predict", data={"top_k": "2.5"}, files=files(good)), 400, "top_k")
    assert_error(client.post("/predict", json={"images": ["%%%"]}), 400, "base64")
    assert_error(client.post("/predict", content=b"{", headers={"content-type": "application/json"}), 400, "JSON")
    assert_error(client.post("/predict", content=b"x", headers={"content-type": "text/plain"}), 400, "text/plain")
    assert_error(client.patch("/classes/alpha", json={"name": "x"}), 400, "label")
    # 404: unknown class or path
    for response in (
        client.get("/classes/nope"),
        client.get("/classes/nope/thumbnail"),
        client.patch("/classes/nope", json={"label": "x"}),
        client.delete("/classes/nope"),
        client.post("/classes/nope/shots", files=files(good)),
    ):
        assert_error(response, 404, "'nope'")
    assert_error(client.get("/no/such/path"), 404)
    # 409: a label already enrolled, by enrolling or renaming
    client.post("/classes", data={"label": "beta"}, files=files(drawing("beta", 0)))
    assert_error(client.post("/classes", data={"label": "alpha"}, files=files(good)), 409, "'alpha'")
    assert_error(client.patch("/classes/beta", json={"label": "alpha"}), 409, "'alpha'")
    # 413: the body, the number of images, an image's pixels
    assert_error(client.post("/predict", files=files(b"\0" * (1024 * 1024 + 1))), 413, "limit of 1048576 bytes")
    assert_error(client.post("/predict", files=files(*[good] * 5)), 413, "5 images")
    big = png(np.zeros((201, 200), np.uint8))
    assert_error(client.post("/predict", files=files(big)), 413, "200x201 pixels")
    assert client.get("/classes").json()["classes"] == [{"label": "alpha", "shots": 1}, {"label": "beta", "shots": 1}]


def test_predict_without_classes_is_a_400(client):
    assert_error(client.post("/predict", files=files(drawing("alpha", 0))), 400, "no classes enrolled")


def test_enrollment_is_all_or_nothing(client):
    broken = drawing("gamma", 1)[:100]  # a truncated PNG
    response = client.post("/classes", data={"label": "gamma"}, files=files(drawing("gamma", 0), broken))
    assert_error(response, 400, "1.png")
    assert client.get("/classes").json() == {"classes": []}
    client.post("/classes", data={"label": "gamma"}, files=files(drawing("gamma", 0)))
    assert_error(client.post("/classes/gamma/shots", files=files(drawing("gamma", 2), broken)), 400, "1.png")
    assert client.get("/classes/gamma").json()["shots"] == 1


def test_the_cli_and_the_service_share_the_store(client, store):
    shots = Path(store).parent / "cli-shots"
    shots.mkdir(exist_ok=True)
    for hand in range(2):
        (shots / f"{hand}.png").write_bytes(drawing("delta", hand))
    cli("enroll", "--store", store, "--label", "delta", shots)  # the CLI enrolls: the service sees it
    assert client.get("/classes").json() == {"classes": [{"label": "delta", "shots": 2}]}
    client.post("/classes", data={"label": "alpha"}, files=files(drawing("alpha", 0)))  # and the other way round
    listed = json.loads(cli("classes", "list", "--store", store, "--json"))
    assert listed == [{"label": "delta", "shots": 2}, {"label": "alpha", "shots": 1}]
    cli("classes", "rename", "--store", store, "delta", "Delta")
    answer = client.post("/predict", files=files(drawing("delta", 3))).json()["predictions"][0]
    assert answer["label"] == "Delta"
    predicted = json.loads(cli("predict", "--store", store, "--json", shots / "0.png"))
    assert predicted[0]["label"] == "Delta"


def test_concurrent_requests(client):
    for name in ("alpha", "beta"):
        client.post("/classes", data={"label": name}, files=files(drawing(name, 0)))
    statuses: list[int] = []
    enrolls: list[int] = []

    def predict(hand: int) -> None:
        for i in range(5):
            name = ("alpha", "beta")[(hand + i) % 2]
            answer = client.post("/predict", files=files(drawing(name, 10 + hand)))
            statuses.append(answer.status_code)

    def enroll_twice(hand: int) -> None:  # four threads enroll one label: one wins, three get 409
        enrolls.append(
            client.post("/classes", data={"label": "gamma"}, files=files(drawing("gamma", hand))).status_code
        )

    threads = [threading.Thread(target=predict, args=(h,)) for h in range(6)]
    threads += [threading.Thread(target=enroll_twice, args=(h,)) for h in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [200] * 30
    assert sorted(enrolls) == [201, 409, 409, 409]
    assert client.get("/classes/gamma").json()["shots"] == 1


def test_api_key_is_required_when_given(tmp_path):
    with serving(tmp_path / "keyed.db", env={"FEWSHOT_EDGE_API_KEY": "s3cret"}) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/").status_code == 200  # the page itself asks for the key
        assert httpx.get(f"{url}/openapi.json").status_code == 200
        assert_error(httpx.get(f"{url}/classes"), 401, "X-API-Key")
        assert_error(httpx.get(f"{url}/info", headers={"X-API-Key": "wrong"}), 401)
        assert_error(httpx.post(f"{url}/predict", files=files(drawing("alpha", 0))), 401)
        info = httpx.get(f"{url}/info", headers={"X-API-Key": "s3cret"}).json()
        assert info["auth"] is True


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--host", "0.0.0.0"], ["not a loopback address", "--insecure"]),
        (["--host", "192.168.1.20"], ["not a loopback address"]),
        (["--host", "0.0.0.0", "--api-key", " "], ["API key is empty"]),
    ],
)
def test_serve_refuses_to_bind_beyond_loopback_without_a_key(tmp_path, args, words):
    result = CliRunner().invoke(
        main, ["serve", "--store", str(tmp_path / "s.db"), *args], env={"FEWSHOT_EDGE_API_KEY": None}
    )
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()
    assert len(line) == 1 and all(w in line[0] for w in words), result.output
    assert not (tmp_path / "s.db").exists()  # refused before anything was opened


def test_a_port_in_use_or_a_mode_the_bundle_lacks_is_one_line_before_serving(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--store", str(tmp_path / "s.db"), "--port", str(port)])
    assert result.exit_code == 2 and result.output.strip().startswith(f"Error: cannot serve on 127.0.0.1:{port}: ")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "s.db").exists()
    result = CliRunner().invoke(
        main, ["serve", "--store", str(tmp_path / "s.db"), "--port", "0", "--adapt", "relation"]
    )
    assert result.exit_code == 2 and "relation" in result.output and len(result.output.strip().splitlines()) == 1
    assert "serving" not in result.output


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.org", ""]))


def test_an_unexpected_error_is_a_500_without_a_traceback(monkeypatch):
    from fastapi.testclient import TestClient

    from fewshot_edge.serve import create_app

    with FewShotModel.open(default_bundle()) as model:
        app = create_app(model, hosts=None)  # the test client's Host is "testserver"

        def broken() -> list[tuple[str, int]]:
            raise RuntimeError("secret detail\nline two")

        monkeypatch.setattr(model, "classes", broken)
        response = TestClient(app, raise_server_exceptions=False).get("/classes")
    assert_error(response, 500, "RuntimeError")
    assert "secret" not in response.text


def test_foreign_hosts_and_cross_origin_writes_are_refused(client):
    """A page elsewhere cannot drive the loopback service: not by rebinding its name to 127.0.0.1 (the
    Host header), nor by a cross-origin form POST from the operator's browser (the Origin header)."""
    shot = files(drawing("alpha", 0))
    assert_error(client.get("/classes", headers={"Host": "evil.example:8000"}), 400, "evil.example")
    foreign = {"Origin": "http://evil.example"}
    assert_error(client.post("/classes", data={"label": "alpha"}, files=shot, headers=foreign), 403, "cross-origin")
    assert_error(client.delete("/classes/alpha", headers=foreign), 403)
    assert client.get("/classes", headers=foreign).status_code == 200  # reads: the browser keeps the answer from it
    same = {"Origin": str(client.base_url).rstrip("/")}
    assert client.post("/classes", data={"label": "alpha"}, files=shot, headers=same).status_code == 201


def test_serve_without_the_extra_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # an import of it fails
    result = CliRunner().invoke(main, ["serve", "--store", str(tmp_path / "s.db")])
    assert result.exit_code == 1 and "pip install 'fewshot-edge[serve]'" in result.output, result.output


def test_a_colour_bundle_enrolls_and_shows_its_rgb_thumbnail():
    """The photo bundle (84x84 RGB, no inversion) through the app in process: the thumbnail is the
    shot exactly as the model keeps it."""
    from fastapi.testclient import TestClient

    from fewshot_edge.serve import create_app

    rng = np.random.default_rng(0)
    photos = [png(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)) for _ in range(2)]
    with FewShotModel.open("mini-conv4") as model:
        client = TestClient(create_app(model, hosts=None))
        assert client.post("/classes", data={"label": "noise"}, files=files(*photos)).status_code == 201
        assert client.get("/info").json()["input"] == {"channels": 3, "height": 84, "width": 84}
        thumb = np.asarray(Image.open(io.BytesIO(client.get("/classes/noise/thumbnail").content)))
        expected = to_pixels(Image.open(io.BytesIO(photos[0])), model.spec).transpose(1, 2, 0)
    np.testing.assert_array_equal(thumb, expected)
