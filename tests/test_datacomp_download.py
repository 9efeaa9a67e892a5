"""DataComp eval-set downloads through huggingface_hub, against a loopback hub (tests/hub_server.py).

The hub serves repos in DataComp's layout (classification: classnames, templates, test shards;
retrieval: dataset_type.txt and shards; WinoGAViL: nlphuji/winogavil's CSV, image zip and loading
script) at the three endpoints ``snapshot_download`` calls; the downloaded folders are then evaluated
by the suite as they are.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hub_server import HubServer
from test_evaluate import (
    BALANCED,
    NAMES,
    TRANSFORM,
    ClassTokenizer,
    KnownModel,
    colour_image,
    write_classification_set,
    write_retrieval_set,
)
from test_winogavil import KNOWN_GAMES, POOL, write_winogavil_set

from amorlip.evaluate import runner, suites
from amorlip.evaluate.download import DownloadError, download_suite


@pytest.fixture(autouse=True)
def hub_online(monkeypatch):
    """`make test` runs with HF_HUB_OFFLINE=1 (the Makefile exports it for the offline demo), which
    huggingface_hub reads once at import: these tests download from a loopback hub, so they switch it
    off the way a user does (the variable) and where huggingface_hub keeps it."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_offline_mode_stops_the_download_naming_the_variable(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE=0"):
        download_suite("datacomp", tmp_path / "datacomp", tasks=["cifar10"])
    assert not (tmp_path / "datacomp").exists() or not any((tmp_path / "datacomp").iterdir())


@pytest.fixture()
def hub(tmp_path):
    site = tmp_path / "hub"
    write_classification_set(site / "djghosh" / suites.datacomp_folder_name("cifar10"), BALANCED, shards=2)
    write_retrieval_set(site / "clip-benchmark" / "wds_flickr30k", n=6)
    broken = site / "djghosh" / suites.datacomp_folder_name("mnist")
    write_classification_set(broken, BALANCED, shards=2)
    (broken / "test" / "1.tar").unlink()  # nshards.txt announces 2
    wino = write_winogavil_set(site / "nlphuji" / "winogavil", KNOWN_GAMES,
                               {name: colour_image(cls) for name, cls in POOL.items()})
    (wino / "README.md").write_text("# WinoGAViL\n")
    (wino / "winogavil.py").write_text("# the loading script: not needed, not fetched\n")
    with HubServer(site) as server:
        yield server, site


def _fetched(requests) -> list[str]:
    """Repo paths of the files the hub sent (GET .../resolve/<revision>/<path>)."""
    return sorted(path.split("/resolve/", 1)[1].split("/", 1)[1]
                  for method, path, _, _ in requests if method == "GET" and "/resolve/" in path)


def test_download_suite_through_the_hub_api(tmp_path, hub, monkeypatch):
    server, site = hub
    root = tmp_path / "datacomp"
    status = download_suite("datacomp", root, tasks=["cifar10", "retrieval/flickr30k", "misc/winogavil"],
                            endpoint=server.endpoint, token="hf_secret", progress=False)
    assert status["cifar10"] == "downloaded" and status["retrieval/flickr30k"] == "downloaded"
    assert status["misc/winogavil"] == "downloaded"
    assert all(auth == "Bearer hf_secret" for *_, auth in server.requests)  # the token reaches the hub
    src = site / "djghosh" / "wds_cifar10_test"
    for rel in ("classnames.txt", "zeroshot_classification_templates.txt", "test/nshards.txt", "test/0.tar",
                "test/1.tar"):
        assert (root / "wds_cifar10_test" / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert not (root / "wds_cifar10_test" / "dataset_type.txt").exists()  # classification: as DataComp has it
    assert (root / "wds_retrieval-flickr30k_test" / "dataset_type.txt").read_text().strip() == "retrieval"
    assert not [p for p in root.rglob("*.incomplete")]
    wino_src, wino_dst = site / "nlphuji" / "winogavil", root / "wds_misc-winogavil_test"
    for rel in ("winogavil_dataset.csv", "winogavil_images.zip"):
        assert (wino_dst / rel).read_bytes() == (wino_src / rel).read_bytes(), rel
    assert not (wino_dst / "winogavil.py").exists() and not (wino_dst / "README.md").exists()

    # the downloaded folders are what the suite reads: evaluate them
    suite = suites.datacomp_suite(root)
    res = runner.evaluate_suite(KnownModel(6), ClassTokenizer(NAMES), TRANSFORM, suite, run="r")
    assert res["tasks"]["cifar10"]["main"] == 1.0 and res["tasks"]["retrieval/flickr30k"]["main"] == 1.0
    assert res["tasks"]["misc/winogavil"]["main"] == pytest.approx(0.5)  # the known games' jaccard_score_10-12
    assert res["aggregates"]["covered"] == 3

    # a rerun through an HF_ENDPOINT mirror: nothing there is fetched again; a lost shard is, alone
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    server.requests.clear()
    assert download_suite("datacomp", root, tasks=["cifar10"], progress=False) == {"cifar10": "complete"}
    assert _fetched(server.requests) == [] and server.requests  # it asked the mirror, fetched nothing
    (root / "wds_cifar10_test" / "test" / "1.tar").unlink()
    server.requests.clear()
    assert download_suite("datacomp", root, tasks=["cifar10"], progress=False) == {"cifar10": "downloaded"}
    assert _fetched(server.requests) == ["test/1.tar"]
    assert (root / "wds_cifar10_test" / "test" / "1.tar").read_bytes() == (src / "test" / "1.tar").read_bytes()


def test_download_failures_are_reported_after_trying_every_task(tmp_path, hub):
    server, _ = hub
    root = tmp_path / "datacomp"
    with pytest.raises(DownloadError, match=r"mnist \(djghosh/wds_mnist_test: OSError: 1 of 2 shard\(s\) missing") as err:
        download_suite("datacomp", root, tasks=["mnist", "imagenet1k", "cifar10"], endpoint=server.endpoint,
                       progress=False)
    assert "imagenet1k (djghosh/wds_imagenet1k_test: RepositoryNotFoundError" in str(err.value)
    assert "Rerun the same command to resume" in str(err.value)
    assert (root / "wds_cifar10_test" / "test" / "1.tar").exists()  # the good task still downloaded
    with pytest.raises(ValueError, match="unknown DataComp task"):
        download_suite("datacomp", root, tasks=["imagenet-z"], endpoint=server.endpoint)


def test_winogavil_download_checks_every_candidate_image(tmp_path):
    site = tmp_path / "hub"
    write_winogavil_set(site / "nlphuji" / "winogavil", KNOWN_GAMES,
                        {name: colour_image(cls) for name, cls in POOL.items() if name != "fig2"})
    with HubServer(site) as server, pytest.raises(DownloadError, match=(
            r"misc/winogavil \(nlphuji/winogavil: ValueError: .*winogavil_images\.zip: 1 candidate image\(s\) "
            r"missing \(winogavil_images/fig2\.jpg\)")):
        download_suite("datacomp", tmp_path / "datacomp", tasks=["misc/winogavil"], endpoint=server.endpoint,
                       progress=False)


def test_download_rule_is_planned_for_the_paper_config_when_sets_are_missing(tmp_path):
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    list_path = tmp_path / "resources" / "cc3m" / "Train_GCC-training.tsv"
    list_path.parent.mkdir(parents=True)
    list_path.write_text("a caption\thttp://example.com/a.jpg\n")
    shutil.copy(repo / "config" / "cc3m-rn50.yaml", tmp_path / "cc3m-rn50.yaml")
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "-s", str(repo / "Snakefile"),
                           "--directory", str(tmp_path), "--configfile", str(tmp_path / "cc3m-rn50.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = {f[0]: int(f[1]) for f in (line.split() for line in proc.stdout.splitlines())
              if len(f) == 2 and f[1].isdigit()}
    assert counts.get("datacomp_evalsets") == 1 and counts.get("download") == 1, proc.stdout
