"""Tests for network/checkpoint.py: round trip, resolution, corrupt and unsafe files."""
import os


import pytest
import torch

from network import CheckpointError, build_model, load_checkpoint, save_checkpoint
from network.checkpoint import list_checkpoints, resolve_checkpoint

CFG = dict(base_network="LDR", preset="plain", n_cascades=2, image_size=[16, 16, 16], channels=2)


def small_model(seed=0):
    torch.manual_seed(seed)
    model = build_model(CFG)
    with torch.no_grad():
        for net in model.cascades:                  # make the output depend visibly on the weights
            net.flow.weight.normal_(0, 0.05)
            net.flow.bias.uniform_(-1, 1)
    return model.eval()


def write_dummy(folder, steps):
    model = small_model()
    return {s: save_checkpoint(str(folder), model, model.config.to_dict(), step=s) for s in steps}


# ------------------------------------------------------------------------------------------------
# round trip
# ------------------------------------------------------------------------------------------------

def test_round_trip_restores_identical_outputs(tmp_path):
    model = small_model(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fixed, moving = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    # one optimiser step (with made-up gradients) so the optimiser has state to save
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        expected = model(fixed, moving)["flow"]
    path = save_checkpoint(str(tmp_path / "run"), model, model.config.to_dict(), step=7, epoch=2,
                           optimizer=opt, train_args={"lr": 1e-3, "batch": 4})
    assert path == str(tmp_path / "run" / "ckpt_7.pt")
    assert os.listdir(tmp_path / "run") == ["ckpt_7.pt"]          # no temporary files left behind

    state = load_checkpoint(str(tmp_path / "run"))
    assert state["step"] == 7 and state["epoch"] == 2 and state["path"] == path
    assert state["train_args"] == {"lr": 1e-3, "batch": 4}
    assert state["model_config"] == model.config.to_dict()
    restored = build_model(state["model_config"]).eval()
    # a freshly built model differs; the loaded weights make it identical
    with torch.no_grad():
        assert not torch.equal(restored(fixed, moving)["flow"], expected)
    restored.load_state_dict(state["model"])
    with torch.no_grad():
        assert torch.equal(restored(fixed, moving)["flow"], expected)
    opt2 = torch.optim.Adam(restored.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], exp_avg)


def test_save_overwrites_same_step_atomically(tmp_path):
    m1, m2 = small_model(1), small_model(2)
    save_checkpoint(str(tmp_path), m1, m1.config.to_dict(), step=3)
    save_checkpoint(str(tmp_path), m2, m2.config.to_dict(), step=3)
    state = load_checkpoint(str(tmp_path))
    key = "cascades.0.flow.bias"
    assert torch.equal(state["model"][key], m2.state_dict()[key])
    assert not torch.equal(state["model"][key], m1.state_dict()[key])
    assert sorted(os.listdir(tmp_path)) == ["ckpt_3.pt"]


# ------------------------------------------------------------------------------------------------
# resolution
# ------------------------------------------------------------------------------------------------

def test_resolve_latest_step_numerically(tmp_path):
    paths = write_dummy(tmp_path, [5, 100, 20])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "ckpt_999.pt.tmp").write_text("partial")
    (tmp_path / ".tmp_abc.pt").write_text("partial")
    assert list_checkpoints(str(tmp_path)) == paths
    assert resolve_checkpoint(str(tmp_path)) == paths[100]        # not "5" (string order) nor "20"
    assert resolve_checkpoint(f"{tmp_path}:20") == paths[20]
    assert resolve_checkpoint(f"{tmp_path}:5") == paths[5]
    assert resolve_checkpoint(paths[20]) == paths[20]              # a .pt file as is
    assert load_checkpoint(f"{tmp_path}:20")["step"] == 20
    assert load_checkpoint(str(tmp_path))["step"] == 100
    with pytest.raises(CheckpointError, match="step 7"):
        resolve_checkpoint(f"{tmp_path}:7")


def test_missing_or_empty_folder(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(CheckpointError):
        load_checkpoint(f"{missing}:10")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(empty))
    assert str(empty) in str(info.value)


# ------------------------------------------------------------------------------------------------
# corrupt, foreign and unsafe files
# ------------------------------------------------------------------------------------------------

def test_truncated_file_raises_checkpoint_error(tmp_path):
    path = write_dummy(tmp_path / "good", [1])[1]
    data = open(path, "rb").read()
    bad = tmp_path / "bad" / "ckpt_1.pt"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(tmp_path / "bad"))
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_raise_checkpoint_error(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    bad = tmp_path / "ckpt_1.pt"
    bad.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(bad))
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("data", [
    b".",            # pickle STOP on an empty stack -> IndexError inside torch's weights-only unpickler
    b"h\xe3",        # BINGET of a memo entry that does not exist -> KeyError
], ids=["stop-empty-stack", "binget-missing-memo"])
def test_corrupt_pickle_opcodes_raise_checkpoint_error(tmp_path, data):
    bad = tmp_path / "ckpt_1.pt"
    bad.write_bytes(data)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(bad))


def test_empty_file_raises_checkpoint_error(tmp_path):
    bad = tmp_path / "ckpt_1.pt"
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match="ckpt_1.pt"):
        load_checkpoint(str(tmp_path))


class _Evil:
    """Unpickling this would create a directory: a visible side effect of executing code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickle_is_refused_without_executing(tmp_path, nested):
    target = str(tmp_path / "pwned")
    path = tmp_path / "run" / "ckpt_1.pt"
    path.parent.mkdir()
    payload = _Evil(target)
    if nested:   # hidden inside an otherwise well-formed checkpoint
        model = small_model()
        payload = {"format": "ldr-rcn-checkpoint", "version": 1, "model_config": model.config.to_dict(),
                   "model": model.state_dict(), "step": 1, "extra": payload}
    torch.save(payload, str(path))
    assert not os.path.exists(target)              # saving did not run it
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path.parent))
    assert str(path) in str(info.value)
    assert not os.path.exists(target)


def test_malicious_payload_really_executes_under_unsafe_load(tmp_path):
    """Control for the test above: the payload is live, so its absence there means something."""
    target = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save(_Evil(target), str(path))
    torch.load(str(path), weights_only=False)
    assert os.path.isdir(target)


def test_foreign_or_incomplete_files_are_refused(tmp_path):
    model = small_model()
    torch.save(model.state_dict(), str(tmp_path / "ckpt_1.pt"))                 # a bare state dict
    with pytest.raises(CheckpointError, match="ckpt_1.pt"):
        load_checkpoint(str(tmp_path / "ckpt_1.pt"))
    torch.save(torch.zeros(3), str(tmp_path / "ckpt_2.pt"))                      # not a dict at all
    with pytest.raises(CheckpointError, match="ckpt_2.pt"):
        load_checkpoint(str(tmp_path / "ckpt_2.pt"))
    torch.save({"format": "ldr-rcn-checkpoint", "version": 1, "model": model.state_dict(), "step": 3},
               str(tmp_path / "ckpt_3.pt"))                                      # lacks model_config
    with pytest.raises(CheckpointError, match="model_config"):
        load_checkpoint(str(tmp_path / "ckpt_3.pt"))
