"""Per-node data staging of multi-node jobs against a real S3-compatible server: one download per node,
the other local ranks wait for it, the node's copy and the staged prefix are deleted afterwards."""

from __future__ import annotations

import threading

import pytest

from sdtune import remote_train
from sdtune.cluster.launch import ephemeral_storage_for
from sdtune.staging import delete_prefix, prefix_size, upload_dir
from tests.servers import ACCESS_KEY, SECRET_KEY, make_bucket


@pytest.fixture
def staged(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_endpoint.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    make_bucket(s3_endpoint.url, "mlpipeline")
    data = tmp_path / "dataset"
    (data / "images").mkdir(parents=True)
    for i in range(3):
        (data / "images" / f"{i}.png").write_bytes(bytes([i]) * 1000)
    (data / "manifest.jsonl").write_text('{"id": 1}\n')
    uri = f"s3://mlpipeline/private-artifacts/team-a/sdtune/staging/{tmp_path.name}/data"
    upload_dir(data, uri)
    return uri


def test_one_download_per_node_and_cleanup(staged, tmp_path, monkeypatch):
    import sdtune.staging as staging

    downloads: list[str] = []
    original = staging.download_prefix

    def counting(uri, local):
        downloads.append(uri)
        return original(uri, local)

    monkeypatch.setattr(staging, "download_prefix", counting)
    root = tmp_path / "node-tmp"
    results: dict[int, object] = {}

    def rank(local_rank: int) -> None:
        results[local_rank] = remote_train.stage_once_per_node(staged, local_rank, root=root, poll_s=0.01)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (3, 1, 2, 0)]  # rank 0 not first
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert downloads == [staged]  # once for the node's 4 ranks
    folders = set(results.values())
    assert len(folders) == 1
    (folder,) = folders
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["0.png", "1.png", "2.png"]
    for local_rank in range(4):
        assert folder.is_dir()  # still there for the ranks not done yet
        remote_train.release_stage(folder.parent, local_rank, ranks_on_node=4)
    assert not folder.parent.exists()  # the last rank out removed the node's copy

    assert prefix_size(staged) == 3 * 1000 + len('{"id": 1}\n')
    assert delete_prefix(staged) == 4 and prefix_size(staged) == 0


def test_waiting_ranks_give_up_with_one_line(tmp_path):
    from sdtune.errors import TrainingError

    with pytest.raises(TrainingError, match="did not stage"):
        remote_train.stage_once_per_node("s3://b/x", 1, root=tmp_path, poll_s=0.01, wait_s=0.05)


def test_ephemeral_storage_is_sized_from_the_dataset():
    assert ephemeral_storage_for(0, "50Gi") == "51Gi"
    assert ephemeral_storage_for(100 * 2**30, "50Gi") == "251Gi"  # 100 GiB staged: copy + latents + base
