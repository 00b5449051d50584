"""Publishing through the real huggingface_hub client against the local Hub server (tests/hub_server.py):
generators (ctx2param.hub, hub_scripts/publish.py), generated adapters as PEFT repositories, model cards,
and offline use of what was downloaded (HF_HUB_OFFLINE=1, in a subprocess: the flag is read at import)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
import yaml
from huggingface_hub import HfApi, snapshot_download
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

try:
    import _methods
except ModuleNotFoundError as _err:  # tests/ imported as a package
    if _err.name != "_methods":
        raise
    from tests import _methods

from ctx2param import AutoModelForContextAdaptation, ContextAdapter, apply_adapter
from ctx2param.cards import (
    ADAPTER_TEMPLATE,
    GENERATOR_TEMPLATE,
    CardData,
    CardTemplateError,
    find_template,
    render_adapter_card,
    render_generator_card,
)
from ctx2param.hub import (
    CARD_DATA_NAME,
    PublishError,
    describe_checkpoint,
    get_card_data,
    push_folder_to_hub,
    push_to_hub,
)
from ctx2param.modeling_utils import CheckpointError

pytestmark = pytest.mark.hub

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
TEXT = "The secret password is Marigold."
PROMPT = torch.tensor([[1, 40, 41, 42, 43, 44]])
_COUNTER = itertools.count()

_methods.register()


def _repo(name: str) -> str:
    return f"org/{name}-{next(_COUNTER)}"


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n"), readme[:80]
    head, _, _ = readme[4:].partition("\n---\n")
    data = yaml.safe_load(head)
    assert isinstance(data, dict)
    return data


@pytest.fixture
def publish_script():
    """``hub_scripts/publish.py`` imported as a module."""
    yield from _methods.load_script(REPO_ROOT / "hub_scripts" / "publish.py", "ctx2param_publish")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _methods.save_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def base_repo(base_dir: Path, local_hub) -> str:
    """The tiny base model also published on the local Hub."""
    repo = _repo("tiny-base")
    local_hub.add_files(repo, {p.name: p for p in base_dir.iterdir()})
    return repo


@pytest.fixture(scope="module")
def generator(base_dir: Path) -> _methods.MeanPoolModel:
    """A generator whose config names its base by a local folder."""
    return _methods.make_generator(str(base_dir))


@pytest.fixture(scope="module")
def hub_generator(base_repo: str) -> _methods.MeanPoolModel:
    """A generator whose config names its base by a Hub id."""
    return _methods.make_generator(base_repo)


@pytest.fixture(scope="module")
def pushed(generator: _methods.MeanPoolModel, local_hub) -> str:
    """``generator`` pushed with ctx2param.hub.push_to_hub (card data filled in)."""
    data = get_card_data(generator)
    data.add_dataset("CoQA", id="stanfordnlp/coqa", num_examples=7983, license="CC BY-SA 4.0")
    data.add_hyperparameters(learning_rate=1e-4, steps=10, batch_size=2)
    for step in range(0, 30, 10):
        data.log_losses(step, loss=2.0 - step / 20, alignment=1.0)
    data.add_result("SQuAD-k", "f1", 41.5, dataset_id="rajpurkar/squad", split="validation", k=4, n=100)
    data.add_result("SQuAD-k", "f1", 47.0, dataset_id="rajpurkar/squad", k=4, n=100, system="icl")
    repo = _repo("generator")
    url = push_to_hub(generator, repo, commit_message="first upload")
    assert repo in url
    return repo


def _logits(model, adapter=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT, adapter=adapter).logits


# --------------------------------------------------------------------------------------------- generators
#: What a published generator repository holds: never the base model's weights.
GENERATOR_FILES = [".gitattributes", "README.md", CARD_DATA_NAME, "config.json", "model.safetensors"]


def test_push_then_from_pretrained_through_the_client(generator, pushed: str, local_hub) -> None:
    files = local_hub.files(pushed)
    assert sorted(files) == GENERATOR_FILES
    assert local_hub.commits(pushed)[0]["title"] == "first upload"
    config = json.loads(files["config.json"])
    assert config["model_type"] == "ctx2param_test_meanpool"
    assert CardData.from_dict(json.loads(files[CARD_DATA_NAME])) == get_card_data(generator)
    local_hub.clear_request_log()
    loaded = AutoModelForContextAdaptation.from_pretrained(pushed)
    # only the generator's repository was asked for, and only its method files were downloaded
    paths = [path for _, path, _ in local_hub.request_log]
    assert paths and all(pushed in path for path in paths), paths
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in local_hub.request_log if "/resolve/" in path}
    assert (
        {"config.json", "model.safetensors"} <= fetched <= {"config.json", "model.safetensors", "README.md"}
    )
    adapter, again = generator.generate_adapter(TEXT), loaded.generate_adapter(TEXT)
    assert all(torch.equal(adapter.delta_weight(n), again.delta_weight(n)) for n in adapter)
    assert torch.equal(_logits(generator, adapter), _logits(loaded, again))


def test_from_pretrained_never_downloads_the_base(
    hub_generator, base_repo: str, base_dir: Path, local_hub, tmp_path: Path
) -> None:
    repo = _repo("hub-base-generator")
    push_to_hub(hub_generator, repo)
    # clutter in the generator repo that must not be fetched either
    local_hub.add_files(repo, {"optimizer.pt": b"\0" * 1000, "training_args.bin": b"\0" * 10})
    assert json.loads(local_hub.files(repo)["config.json"])["base_model_name_or_path"] == base_repo
    local_hub.clear_request_log()
    loaded = AutoModelForContextAdaptation.from_pretrained(repo, base_model=str(base_dir))
    paths = [path for _, path, _ in local_hub.request_log]
    assert paths and not [p for p in paths if base_repo in p], paths
    assert not [p for p in paths if p.endswith((".pt", ".bin"))], paths
    assert torch.equal(_logits(loaded), _logits(hub_generator))


def test_generator_card(pushed: str, local_hub) -> None:
    readme = local_hub.files(pushed)["README.md"].decode()
    meta = _front_matter(readme)
    assert meta["library_name"] == "ctx2param"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert {"ctx2param", "test_meanpool"} <= set(meta["tags"])
    assert meta["datasets"] == ["stanfordnlp/coqa"]
    assert meta["metrics"] == ["f1"]
    assert "base_model" not in meta  # the config names a local folder, which is not Hub metadata
    (index,) = meta["model-index"]
    (result,) = index["results"]  # the ICL baseline is in the table only
    assert result["metrics"] == [{"type": "f1", "value": 41.5}]
    assert result["dataset"]["type"] == "rajpurkar/squad"
    for text in ("## Usage", "AutoModelForContextAdaptation.from_pretrained", "## Training", "## Evaluation"):
        assert text in readme
    assert "| SQuAD-k | rajpurkar/squad | validation | 4 | test_meanpool | f1 | 41.5 | 100 |" in readme
    assert "| SQuAD-k | rajpurkar/squad |  | 4 | icl | f1 | 47 | 100 |" in readme
    assert "| learning_rate | 0.0001 |" in readme and "| step | loss | alignment |" in readme
    assert "@article{jukic2025compas" in readme and "@article{muhtar2024streamadapter" in readme
    assert "base_model=" in readme  # tells users to pass the base explicitly
    # the server parsed the same metadata from the uploaded card
    assert HfApi().model_info(pushed).card_data["library_name"] == "ctx2param"


def test_generator_card_with_hub_base_and_no_card_data(hub_generator, base_repo: str) -> None:
    readme = render_generator_card(hub_generator.config, None, repo_id="org/name", num_parameters=1234)
    meta = _front_matter(readme)
    assert meta["base_model"] == base_repo
    assert "model-index" not in meta and "datasets" not in meta
    assert "No evaluation results" in readme and "1,234 parameters" in readme
    assert 'from_pretrained("org/name")' in readme
    compas = render_generator_card({"model_type": "ctx2param_compas", "method": "compas"}, None)
    assert "CompAs" in compas and compas.index("jukic2025compas") < compas.index("muhtar2024streamadapter")
    stream = render_generator_card(
        {"model_type": "ctx2param_stream_adapter", "method": "stream_adapter"}, None
    )
    assert stream.index("muhtar2024streamadapter") < stream.index("jukic2025compas")


def test_card_templates_are_found_and_missing_ones_reported(monkeypatch, tmp_path: Path) -> None:
    assert find_template(GENERATOR_TEMPLATE) == REPO_ROOT / "model_cards" / GENERATOR_TEMPLATE
    assert find_template(ADAPTER_TEMPLATE).parent == REPO_ROOT / "model_cards"
    monkeypatch.setattr("ctx2param.cards.template_dirs", lambda: [tmp_path / "nowhere"])
    with pytest.raises(CardTemplateError, match="not found") as info:
        render_generator_card({"model_type": "ctx2param_x"})
    assert "nowhere" in str(info.value)


def test_card_data_round_trip_and_errors(tmp_path: Path) -> None:
    data = CardData(model_name="m", hardware="1x CPU", training_time_s=12.0)
    data.add_dataset("BoolQ", id="google/boolq", num_examples=3270)
    data.add_result("ARC-Challenge", "accuracy", 0.31, k=5, n=299, task_type="multiple-choice")
    path = data.save(tmp_path / CARD_DATA_NAME)
    assert CardData.load(path) == data
    with pytest.raises(ValueError, match="Unknown card data fields"):
        CardData.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="newer"):
        CardData.from_dict({"schema_version": 99})
    with pytest.raises(TypeError):
        data.add_hyperparameters(device=torch.device("cpu"))  # not JSON-serialisable


def test_repush_replaces_stale_shards(generator, local_hub) -> None:
    repo = _repo("reshard")
    push_to_hub(generator, repo, max_shard_size="40KB")
    assert "model.safetensors.index.json" in local_hub.files(repo)
    push_to_hub(generator, repo)
    names = sorted(local_hub.files(repo))
    assert names == [".gitattributes", "README.md", CARD_DATA_NAME, "config.json", "model.safetensors"]
    assert torch.equal(AutoModelForContextAdaptation.from_pretrained(repo).down.weight, generator.down.weight)


def test_model_push_to_hub_is_ctx2param_push(generator, local_hub) -> None:
    """``model.push_to_hub(repo)`` (the public API) publishes what ``ctx2param.hub.push_to_hub`` does, not
    transformers' generic upload."""
    repo = _repo("method-push")
    url = generator.push_to_hub(repo, commit_message="via the model")
    assert repo in url
    files = local_hub.files(repo)
    assert sorted(files) == GENERATOR_FILES
    assert local_hub.commits(repo)[0]["title"] == "via the model"
    meta = _front_matter(files["README.md"].decode())
    assert meta["library_name"] == "ctx2param"
    assert CardData.from_dict(json.loads(files[CARD_DATA_NAME])) == get_card_data(generator)
    weights = local_hub.files(repo)["model.safetensors"]
    header = json.loads(weights[8 : 8 + int.from_bytes(weights[:8], "little")])
    assert header and not [k for k in header if k.startswith("base_lm.")]
    loaded = AutoModelForContextAdaptation.from_pretrained(repo)
    adapter, again = generator.generate_adapter(TEXT), loaded.generate_adapter(TEXT)
    assert list(adapter) == list(again)
    assert all(torch.equal(adapter.delta_weight(n), again.delta_weight(n)) for n in adapter)
    with pytest.raises(TypeError, match="safe_serialization"):
        generator.push_to_hub(repo, safe_serialization=True)


def test_model_push_to_hub_without_a_registered_publisher(generator, monkeypatch) -> None:
    monkeypatch.setattr("ctx2param.modeling_utils._PUBLISHER", None)
    with pytest.raises(Exception, match="No publisher is registered"):
        generator.push_to_hub("org/unregistered")


# ------------------------------------------------------------------------------------- publish.py and folders
def test_publish_script(generator, base_repo: str, local_hub, tmp_path: Path, capsys, publish_script) -> None:
    folder = Path(generator.save_pretrained(tmp_path / "trained"))
    card = CardData(license="mit")
    card.add_dataset("passages", id="org/passages")
    card.save(folder / CARD_DATA_NAME)
    (folder / "optimizer.pt").write_bytes(b"\0" * 100)  # training leftovers stay local
    (folder / "checkpoint-10").mkdir()
    repo = _repo("published")
    publish = publish_script
    assert publish.main([str(folder), repo, "--private", "--base-model-id", base_repo]) == 0
    assert repo in capsys.readouterr().out
    files = local_hub.files(repo)
    assert sorted(files) == GENERATOR_FILES
    assert HfApi().model_info(repo).private is True
    assert json.loads(files["config.json"])["base_model_name_or_path"] == base_repo
    assert json.loads((folder / "config.json").read_text())["base_model_name_or_path"] != base_repo
    meta = _front_matter(files["README.md"].decode())
    assert (
        meta["base_model"] == base_repo and meta["license"] == "mit" and meta["datasets"] == ["org/passages"]
    )
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    # the published repo loads with the base from the Hub id now in its config
    loaded = AutoModelForContextAdaptation.from_pretrained(repo)
    assert torch.equal(_logits(loaded), _logits(generator))
    # bad folders: clear errors, exit status 1, nothing uploaded
    (folder / "model.safetensors").unlink()
    assert publish.main([str(folder), _repo("never")]) == 1
    assert "Missing weight file" in capsys.readouterr().err


def test_push_folder_refuses_bad_folders(generator, tmp_path: Path, local_hub) -> None:
    repos_before = set(local_hub.repos())
    with pytest.raises(CheckpointError, match="not a folder"):
        push_folder_to_hub(tmp_path / "missing", "org/x")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        push_folder_to_hub(tmp_path / "plain", "org/x")
    folder = Path(generator.save_pretrained(tmp_path / "gen"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        push_folder_to_hub(folder, "org/x")
    save_file({**generator.method_state_dict(), "base_lm.lm_head.weight": torch.zeros(4, 4)}, str(weights))
    assert describe_checkpoint(folder)["base_weights_included"] is True
    with pytest.raises(PublishError, match="base-model tensors"):
        push_folder_to_hub(folder, "org/x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a ctx2param generator"):
        push_folder_to_hub(other, "org/x")
    assert set(local_hub.repos()) == repos_before


# ---------------------------------------------------------------------------------------------- adapters
def test_adapter_push_to_hub_is_a_peft_repo(hub_generator, base_repo: str, base_dir: Path, local_hub) -> None:
    adapter = hub_generator.generate_adapter(TEXT).detach()
    repo = _repo("adapter")
    adapter.push_to_hub(repo, card_data={"generator": "org/generator", "context_summary": "a password"})
    files = local_hub.files(repo)
    assert sorted(files) == [
        ".gitattributes",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    meta = _front_matter(files["README.md"].decode())
    assert meta["library_name"] == "peft" and meta["base_model"] == base_repo
    assert f"base_model:adapter:{base_repo}" in meta["tags"] and "ctx2param" in meta["tags"]
    assert meta["pipeline_tag"] == "text-generation"
    readme = files["README.md"].decode()
    assert "PeftModel.from_pretrained" in readme and "a password" in readme
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad(), apply_adapter(base, adapter):
        expected = base(PROMPT).logits
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), repo)
    with torch.no_grad():
        got = peft_model(PROMPT).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, base(PROMPT).logits, atol=1e-4)
    back = ContextAdapter.from_pretrained(repo)
    for name in adapter:
        torch.testing.assert_close(back.delta_weight(name), adapter.delta_weight(name), atol=1e-6, rtol=1e-5)


def test_adapter_card_fields(generator) -> None:
    adapter = generator.generate_adapter(TEXT).detach()
    local = _front_matter(render_adapter_card(adapter))  # the base is a local folder: no Hub metadata
    assert local["library_name"] == "peft" and "base_model" not in local
    assert not [t for t in local["tags"] if t.startswith("base_model:")]
    named = _front_matter(render_adapter_card(adapter, base_model="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert named["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in named["tags"]
    with pytest.raises(TypeError, match="Unknown adapter card fields"):
        render_adapter_card(adapter, colour="blue")


# ----------------------------------------------------------------------------------------------- offline
@pytest.fixture(scope="module")
def offline_run(generator, pushed: str, local_hub) -> dict:
    """Run one subprocess with HF_HUB_OFFLINE=1 (the flag is read when huggingface_hub is imported) after
    caching a generator and an adapter; it records what loads and the errors of what is not cached."""
    adapter_repo = _repo("offline-adapter")
    generator.generate_adapter(TEXT).detach().push_to_hub(adapter_repo)
    AutoModelForContextAdaptation.from_pretrained(pushed)  # both now in the cache
    ContextAdapter.from_pretrained(adapter_repo)
    # a generator whose base (a Hub id) was never downloaded: its own files are cached, the base is not
    orphan, orphan_base = _repo("orphan"), _repo("uncached-base")
    push_to_hub(generator, orphan, base_model_id=orphan_base)
    snapshot_download(orphan)
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        import _methods
        _methods.register()
        from ctx2param import AutoModelForContextAdaptation, ContextAdapter
        from ctx2param.hub import push_to_hub
        out = {{}}
        model = AutoModelForContextAdaptation.from_pretrained({pushed!r})
        out["norm"] = float(model.generate_adapter({TEXT!r}).norm())
        out["adapter_modules"] = len(ContextAdapter.from_pretrained({adapter_repo!r}))
        for key, call in (
            ("missing_generator", lambda: AutoModelForContextAdaptation.from_pretrained("org/never-seen")),
            ("missing_adapter", lambda: ContextAdapter.from_pretrained("org/never-downloaded-adapter")),
            ("push", lambda: push_to_hub(model, "org/offline-push")),
            ("missing_base", lambda: AutoModelForContextAdaptation.from_pretrained({orphan!r})),
        ):
            try:
                call()
                out[key] = None
            except Exception as err:
                out[key] = [type(err).__name__, str(err)]
        print(json.dumps(out))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    local_hub.clear_request_log()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["requests"] = local_hub.request_log
    out["orphan_base"] = orphan_base
    return out


def test_offline_mode_uses_the_cache_and_names_what_is_missing(generator, offline_run: dict) -> None:
    """With HF_HUB_OFFLINE=1 what was downloaded loads from the cache without a request to the server; a
    generator or adapter that is not cached is named in the error; publishing says it needs the network."""
    out = offline_run
    assert out["requests"] == []  # nothing went to the server
    assert out["norm"] == pytest.approx(float(generator.generate_adapter(TEXT).detach().norm()), rel=1e-6)
    assert out["adapter_modules"] == len(generator.config.target_shapes)
    kind, message = out["missing_generator"]
    assert kind == "CheckpointError" and "org/never-seen" in message and "config.json" in message
    assert "offline" in message
    kind, message = out["missing_adapter"]
    assert kind == "AdapterFileError" and "org/never-downloaded-adapter" in message
    kind, message = out["push"]
    assert kind == "PublishError" and "HF_HUB_OFFLINE" in message


def test_offline_mode_names_a_missing_base(offline_run: dict) -> None:
    """A cached generator whose base was never downloaded: the error names the base and the offline flag."""
    kind, message = offline_run["missing_base"]
    assert kind == "BaseModelError", (kind, message)
    assert offline_run["orphan_base"] in message and "HF_HUB_OFFLINE=1" in message, message
    assert "base_model=" in message  # says what to do
