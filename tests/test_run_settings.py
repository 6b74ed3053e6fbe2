"""A workdir's record of its settings: the first config is kept, a resume's changes are sorted
into refused, accepted and accepted-when-asked, and each accepted change is on record."""

import json
import sys
from pathlib import Path

import pytest

from qstar_jax import run_settings
from qstar_jax.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
from tiny import get_config  # noqa: E402


def changed(**overrides):
    config = get_config()
    for key, value in overrides.items():
        section, _, name = key.rpartition("__")
        (config[section] if section else config)[name] = value
    return config


@pytest.mark.parametrize("key, kind", [
    ("train_steps", "may"), ("mesh.fsdp", "may"), ("model.remat_policy", "may"),
    ("model.d_model", "fixed"), ("model.scan_layers", "fixed"), ("quiet_star.n_ahead", "fixed"),
    ("data.path", "fixed"), ("seed", "fixed"), ("eval_batches", "fixed"),
    ("optim.learning_rate", "flag"), ("model.dtype", "flag"), ("a_key_of_the_future", "flag"),
])
def test_each_key_has_one_kind(key, kind):
    assert run_settings.kind(key) == kind


def test_a_new_run_writes_its_config_and_a_resume_with_the_same_settings_changes_nothing(
        tmp_path):
    assert run_settings.check(str(tmp_path), get_config()) == {}
    first = (tmp_path / run_settings.CONFIG_FILE).read_text()
    assert json.loads(first)["quiet_star"]["n_ahead"] == 4
    assert run_settings.check(str(tmp_path), get_config()) == {}
    assert run_settings.load_config(str(tmp_path)) == get_config()


def test_a_fixed_key_refuses_the_resume_naming_every_difference(tmp_path):
    run_settings.check(str(tmp_path), get_config())
    with pytest.raises(ConfigError, match=r"^\S+ holds a run whose settings a resume cannot "
                       r"change: quiet_star.n_ahead 4 -> 3 \(other keys that "
                       r"differ: optim.learning_rate 0.001 -> 0.5\); resume with the saved values "
                       r"\(see \S+config.json\), or delete \S+ \(it has no saved step\)"):
        run_settings.check(str(tmp_path), changed(quiet_star__n_ahead=3,
                                                  optim__learning_rate=0.5))
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"model.d_model 64 -> 32; .*or train afresh in a new "
                       r"--workdir$"):
        run_settings.check(str(tmp_path), changed(model__d_model=32), allow_changes=True)


def test_other_keys_need_to_be_asked_for_and_every_accepted_change_is_on_record(tmp_path):
    workdir = str(tmp_path)
    run_settings.check(workdir, get_config())
    first = (tmp_path / run_settings.CONFIG_FILE).read_bytes()
    with pytest.raises(ConfigError, match=r"would change optim.learning_rate 0.001 -> 0.5: pass "
                       "--resume_with_changes"):
        run_settings.check(workdir, changed(optim__learning_rate=0.5, train_steps=60))
    longer = changed(train_steps=60)
    changes = run_settings.check(workdir, longer)
    assert changes == {"train_steps": (30, 60)}
    assert run_settings.describe(changes) == "train_steps 30 -> 60"
    assert not (tmp_path / run_settings.HISTORY_FILE).exists()  # recorded once resumed
    (tmp_path / "checkpoints" / "30").mkdir(parents=True)
    run_settings.record(workdir, changes)
    faster = changed(train_steps=60, optim__learning_rate=0.5)
    run_settings.record(workdir, run_settings.check(workdir, faster, allow_changes=True))
    assert (tmp_path / run_settings.CONFIG_FILE).read_bytes() == first
    history = [json.loads(x) for x in (tmp_path / run_settings.HISTORY_FILE).read_text()
               .splitlines()]
    assert [h["changes"] for h in history] == [{"train_steps": [30, 60]},
                                               {"optim.learning_rate": [0.001, 0.5]}]
    assert [h["after_step"] for h in history] == [30, 30]
    assert run_settings.load_config(workdir) == faster
    assert run_settings.check(workdir, faster) == {}
