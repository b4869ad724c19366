"""Guards the dataset repositories of the local Hub stand-in (tests/hub_server.py): `datasets.load_dataset`
streams a parquet config and a JSONL config from it by config name and split, a missing config is an error
that names it, the token is required, and the file downloads answer HEAD and Range requests as the Hub does
(ETag, X-Repo-Commit, Content-Length, 206 and 416); preflight and prep.py stream the config, split and
column that a dataset value's options name. Nothing leaves the machine."""

import io
import json
import socket

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_server import HubStandIn, point_datasets_at
from huggingface_hub.errors import HfHubHTTPError

TOKEN = "hf_TESTdatasets0123456789abcdef"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parquet(**columns) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def jsonl(*rows) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def readme(configs: dict[str, dict[str, str]]) -> bytes:
    """A dataset card whose YAML front matter declares `configs` ({name: {split: path pattern}})."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {pattern}" for split, pattern in splits.items()]
    return "\n".join(lines + ["---", "# A corpus for tests", ""]).encode()


# datasets picks one builder for a whole repository, from the files of its first config, so a parquet
# config and a JSONL config live in two repositories here, as they must on the Hub.
CORPUS = {
    "README.md": readme(
        {"en": {"train": "en/train-*.parquet", "test": "en/test-*.parquet"}, "la": {"train": "la/*.parquet"}}
    ),
    "en/train-00000.parquet": parquet(text=["once upon a time", "a small model"], n=[1, 2]),
    "en/train-00001.parquet": parquet(text=["learned to speak"], n=[3]),
    "en/test-00000.parquet": parquet(text=["held out"], n=[9]),
    "la/data.parquet": parquet(text=["lorem ipsum"], n=[0]),
}
NOTES = {
    "README.md": readme({"fr": {"train": "fr/*.jsonl"}, "de": {"train": "de/*.jsonl"}}),
    "fr/data.jsonl": jsonl({"text": "il était une fois", "id": 1}, {"text": "un petit modèle", "id": 2}),
    "de/data.jsonl": jsonl({"text": "es war einmal", "id": 1}),
}


@pytest.fixture(autouse=True)
def only_loopback(monkeypatch):
    """Every host name looked up in this process during the test must be the stand-in's: one that is not
    fails the lookup (so the connection never happens) and the test."""
    refused = []
    lookup = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if str(host) not in LOOPBACK:
            refused.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: outside the Hub stand-in")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    yield
    assert not refused, f"the test tried to reach {refused}"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubStandIn(token=TOKEN, user="tester") as server:
        server.add_dataset("tester/corpus", CORPUS)
        server.add_dataset("tester/notes", NOTES)
        point_datasets_at(server, monkeypatch, tmp_path / "hf_home")
        yield server
        # A client upgrade that asks for a route the stand-in lacks shows here, not as a puzzling failure.
        assert not [(r.method, r.path) for r in server.unrouted]


def stream(repo: str, name: str, split: str = "train", token: str = TOKEN) -> list[dict]:
    import datasets

    return list(datasets.load_dataset(repo, name=name, split=split, streaming=True, token=token))


def test_streams_a_parquet_config_by_name_and_split(hub):
    assert stream("tester/corpus", "en") == [
        {"text": "once upon a time", "n": 1},
        {"text": "a small model", "n": 2},
        {"text": "learned to speak", "n": 3},
    ]
    assert stream("tester/corpus", "en", split="test") == [{"text": "held out", "n": 9}]
    assert stream("tester/corpus", "la") == [{"text": "lorem ipsum", "n": 0}]
    # pyarrow read the parquet files by ranges, and every request carried the token.
    reads = hub.requests_to("GET", r"/datasets/tester/corpus/resolve/[0-9a-f]{40}/en/train-0000[01]\.parquet")
    assert reads and all(r.headers.get("range", "").startswith("bytes=") for r in reads)
    assert all(
        r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests if r.path != "/api/agent-harnesses"
    )


def test_streams_a_jsonl_config_by_name_and_split(hub):
    assert stream("tester/notes", "fr") == [
        {"text": "il était une fois", "id": 1},
        {"text": "un petit modèle", "id": 2},
    ]
    assert stream("tester/notes", "de") == [{"text": "es war einmal", "id": 1}]
    assert not hub.requests_to("GET", r".*/fr/.*\.parquet")


def test_a_missing_config_is_an_error_that_names_it(hub):
    with pytest.raises(ValueError, match=r"BuilderConfig 'xx' not found.*'en'.*'la'"):
        stream("tester/corpus", "xx")


def test_a_wrong_token_reads_nothing(hub):
    with pytest.raises(HfHubHTTPError, match="Invalid credentials") as caught:
        stream("tester/corpus", "en", token="hf_not_the_token")
    assert caught.value.response.status_code == 401
    assert not hub.requests_to("GET", r"/datasets/.*\.parquet")


def test_file_downloads_answer_head_and_ranges_like_the_hub(hub):
    data = CORPUS["en/test-00000.parquet"]
    head = hub.datasets["tester/corpus"].head
    url = f"{hub.endpoint}/datasets/tester/corpus/resolve/main/en/test-00000.parquet"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(headers=auth) as client:
        answer = client.head(url)
        assert answer.status_code == 200 and answer.content == b""
        assert answer.headers["content-length"] == str(len(data))
        assert answer.headers["x-repo-commit"] == head and answer.headers["etag"].strip('"')
        assert client.get(url).content == data
        first = client.get(url, headers={"Range": "bytes=0-3"})
        assert (first.status_code, first.content) == (206, b"PAR1")
        assert first.headers["content-range"] == f"bytes 0-3/{len(data)}"
        assert client.get(url, headers={"Range": "bytes=-8"}).content == data[-8:]
        assert client.get(url, headers={"Range": f"bytes={len(data) - 2}-"}).content == data[-2:]
        assert client.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
        missing = client.head(url.replace("test-00000", "test-00009"))
        assert missing.status_code == 404 and missing.headers["x-error-code"] == "EntryNotFound"
        assert client.get(url.replace("/main/", "/v9/")).headers["x-error-code"] == "RevisionNotFound"
        assert client.get(url, headers={"Authorization": "Bearer hf_wrong"}).status_code == 401


def test_tree_and_paths_info_list_files_and_folders(hub):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    top = {entry.path for entry in api.list_repo_tree("tester/corpus", repo_type="dataset")}
    assert top == {"README.md", "en", "la"}
    below = {entry.path for entry in api.list_repo_tree("tester/corpus", "en", repo_type="dataset", recursive=True)}
    assert below == {"en/train-00000.parquet", "en/train-00001.parquet", "en/test-00000.parquet"}
    found = api.get_paths_info("tester/corpus", ["la", "la/data.parquet", "nowhere.txt"], repo_type="dataset")
    assert {(type(entry).__name__, entry.path) for entry in found} == {
        ("RepoFolder", "la"),
        ("RepoFile", "la/data.parquet"),
    }
    info = api.dataset_info("tester/corpus")
    assert info.sha == hub.datasets["tester/corpus"].head
    assert [config["config_name"] for config in info.card_data["configs"]] == ["en", "la"]


def test_prep_and_preflight_stream_the_config_split_and_column_that_the_dataset_value_names(hub, tmp_path):
    import config
    import preflight
    import prep

    documents = [f"Document {n}: the fox and the owl count to {n}." for n in range(40)]
    hub.add_dataset(
        "tester/books",
        {
            "README.md": readme({"short": {"train": "short/train.parquet", "validation": "short/val.parquet"}}),
            "short/train.parquet": parquet(body=documents, n=list(range(40))),
            "short/val.parquet": parquet(body=["held out"], n=[0]),
        },
    )
    env = {
        "INPUT_DATASET": "tester/books?config=short&split=train&column=body",
        "HF_TOKEN": TOKEN,
        "HF_ENDPOINT": hub.endpoint,
        "OUTPUT_DIR": str(tmp_path / "output"),
        "WORK_DIR": str(tmp_path / "work"),
        "PRESET": "full",
        "VOCAB_SIZE": "512",
        "FACTOR": "768",
        "MAX_LENGTH": "64",
        "SHARD_SIZE": "40",
    }
    settings = config.load_settings(env)
    check = preflight.check_dataset(settings)
    assert check.status == preflight.PASS and "Hub dataset tester/books (streamed); first 5 rows usable" in check.detail
    manifest = prep.prepare(settings)
    assert manifest["rows"] == 40 and manifest["skipped_rows"] == 0
    wrong = config.load_settings({**env, "INPUT_DATASET": "tester/books?config=short&split=dev"})
    assert preflight.check_dataset(wrong).detail.endswith(
        "the Hub dataset has no 'dev' split (splits: train, validation); name one with ?split="
    )
