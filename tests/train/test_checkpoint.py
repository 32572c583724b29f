"""Checkpoints: safetensors + JSON, atomic pointer, checksums, optimizer state round trip."""

from __future__ import annotations

import json

import pytest
import torch

from pneumoscope.errors import ModelError
from pneumoscope.train.checkpoint import (load_model_state, load_training_state, resolve_checkpoint,
                                          save_checkpoint)


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def test_round_trip_weights_optimizer_and_state(tmp_path):
    model, opt = _model_and_opt()
    d = save_checkpoint(tmp_path, "last", model=model, optimizer=opt, meta={"note": "x"},
                        state={"fit": {"epoch": 3}, "history": [{"epoch": 1}]})
    assert {p.name for p in d.iterdir()} == {"model.safetensors", "model.json", "optim.safetensors", "state.json"}
    assert resolve_checkpoint(tmp_path, "last") == d
    model2, _ = _model_and_opt()
    with torch.no_grad():
        for p in model2.parameters():
            p.zero_()
    model2.load_state_dict(load_model_state(d))
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)
    state = load_training_state(d, opt2)
    assert state["fit"] == {"epoch": 3} and state["history"] == [{"epoch": 1}]
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == pytest.approx(1e-3)
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][k][name]))


def test_pointer_moves_atomically_and_old_dirs_are_pruned(tmp_path):
    model, opt = _model_and_opt()
    dirs = [save_checkpoint(tmp_path, "last", model=model, optimizer=opt, meta={}, keep=2) for _ in range(4)]
    assert resolve_checkpoint(tmp_path, "last") == dirs[-1]
    assert sorted(p.name for p in tmp_path.glob("last-*")) == [dirs[-2].name, dirs[-1].name]


def test_damaged_checkpoint_is_refused(tmp_path):
    model, _ = _model_and_opt()
    d = save_checkpoint(tmp_path, "best", model=model, meta={})
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum"):
        resolve_checkpoint(tmp_path, "best")


def test_a_half_written_new_checkpoint_leaves_the_previous_in_force(tmp_path, monkeypatch):
    model, _ = _model_and_opt()
    first = save_checkpoint(tmp_path, "best", model=model, meta={"v": 1})
    import pneumoscope.train.checkpoint as ck

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "atomic_write_json", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, "best", model=model, meta={"v": 2})
    monkeypatch.undo()
    assert resolve_checkpoint(tmp_path, "best") == first
    assert json.loads((first / "model.json").read_text()) == {"v": 1}


def test_a_pickle_is_never_loaded(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    d = tmp_path / "ck"
    d.mkdir()
    (d / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelError):
        load_model_state(d)
    assert not (tmp_path / "pwned").exists()
