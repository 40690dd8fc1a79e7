"""Loading and unloading adapters at run time: off by default, only from allowed folders."""

from __future__ import annotations

import os

import httpx
import openai
import pytest
from openai import OpenAI

from tests.serve.conftest import chat, live_server, make_random_adapter
from tunelab.serve.app import create_app
from tunelab.serve.engine import Engine


@pytest.fixture
def library(tiny_model_dir, adapter_dirs, tmp_path):
    """An allowed adapter folder holding 'd', and an adapter outside it."""
    lib = tmp_path / "library"
    make_random_adapter(tiny_model_dir, lib / "d", 21, ["q_proj", "up_proj"], 4)
    make_random_adapter(tiny_model_dir, tmp_path / "outside", 22, ["q_proj"], 2)
    os.symlink(tmp_path / "outside", lib / "sneaky")  # a link out of the library
    return lib


@pytest.fixture
def admin_engine(tiny_model_dir, adapter_dirs):
    eng = Engine.load(str(tiny_model_dir), [("a", str(adapter_dirs["a"]))], name="tiny",
                      device="cpu").start()
    yield eng
    eng.close()


def test_admin_is_off_by_default(server):
    r = httpx.post(f"{server}/admin/adapters", json={"name": "x", "path": "x"})
    assert r.status_code == 404 and "error" in r.json()


def test_admin_needs_an_adapter_dir(admin_engine):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="adapter-dir"):
        create_app(admin_engine, admin=True)


def test_load_use_and_unload_adapters_at_run_time(admin_engine, library, tmp_path):
    app = create_app(admin_engine, admin=True, adapter_dirs=[library], api_key="k")
    with live_server(app) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        admin = httpx.Client(base_url=url, headers={"Authorization": "Bearer k"})
        assert httpx.post(f"{url}/admin/adapters", json={"name": "d", "path": "d"}
                          ).status_code == 401  # the API key guards admin too

        before = chat(client, "tiny", "hello", max_tokens=8).choices[0].message.content
        r = admin.post("/admin/adapters", json={"name": "d", "path": "d"})
        assert r.status_code == 201, r.text
        assert [m.id for m in client.models.list().data] == ["tiny", "a", "d"]
        with_d = chat(client, "d", "hello", max_tokens=8).choices[0].message.content
        assert with_d != before
        assert chat(client, "tiny", "hello", max_tokens=8).choices[0].message.content == before

        # refused: taken names, odd names, traversal, absolute paths and links out of the dir
        assert admin.post("/admin/adapters", json={"name": "d", "path": "d"}).status_code == 409
        for bad_name in ("../d", "a/b", "", "__base__", "x" * 65, "-lead", "sp ace"):
            r = admin.post("/admin/adapters", json={"name": bad_name, "path": "d"})
            assert r.status_code == 400, bad_name
            assert r.json()["error"]["param"] == "name"
        for bad_path in ("../outside", "d/../../outside", str(tmp_path / "outside"), "sneaky",
                         "/etc"):
            r = admin.post("/admin/adapters", json={"name": "e", "path": bad_path})
            assert r.status_code == 403, bad_path
            assert r.json()["error"]["code"] == "path_not_allowed"
        assert admin.post("/admin/adapters", json={"name": "e", "path": "missing"}
                          ).status_code == 404
        (library / "notadapter").mkdir()
        assert admin.post("/admin/adapters", json={"name": "e", "path": "notadapter"}
                          ).status_code == 400
        assert admin.post("/admin/adapters", content=b"[1").status_code == 400

        # unload: the adapter disappears, the others keep working, even the last one
        assert admin.delete("/admin/adapters/d").status_code == 200
        with pytest.raises(openai.NotFoundError):
            chat(client, "d", "hello")
        assert admin.delete("/admin/adapters/d").status_code == 404
        assert admin.delete("/admin/adapters/a").status_code == 200
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert chat(client, "tiny", "hello", max_tokens=8).choices[0].message.content == before
        # and adapters can come back after the last one went
        assert admin.post("/admin/adapters", json={"name": "d", "path": str(library / "d")}
                          ).status_code == 201
        assert chat(client, "d", "hello", max_tokens=8).choices[0].message.content == with_d
