"""Persistence: our objects pickle in the official format and come back as our classes, without running code."""

from __future__ import annotations

import pickle
import pickletools

import pytest
import torch

from torch_utils import persistence
from training.loss import EDMLoss
from training.networks import EDMPrecond, iDDPMPrecond


def test_network_round_trip(tiny_edm_net):
    data = pickle.dumps(tiny_edm_net, protocol=4)
    net = pickle.loads(data)
    assert type(net) is EDMPrecond and not net.training
    assert persistence.init_kwargs_of(net) == persistence.init_kwargs_of(tiny_edm_net)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 5.0])
    labels = torch.eye(10)[[3, 7]]
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma, labels), tiny_edm_net(x, sigma, labels), rtol=0, atol=0)
    for a, b in zip(net.state_dict().values(), tiny_edm_net.state_dict().values()):
        assert torch.equal(a, b)


def test_pickle_has_official_shape(tiny_edm_net):
    """Top level reduces through _reconstruct_persistent_obj with a meta dict (type, version, module_src, ...)."""
    reduce_fn, (meta,) = tiny_edm_net.__reduce__()
    assert reduce_fn.__module__ == "torch_utils.persistence" and reduce_fn.__name__ == "_reconstruct_persistent_obj"
    assert meta["type"] == "class" and meta["version"] == 6 and meta["class_name"] == "EDMPrecond"
    assert "class EDMPrecond" in meta["module_src"]
    assert meta["state"]["_init_kwargs"]["model_type"] == "SongUNet"
    globals_used = {arg for op, arg, _ in pickletools.genops(pickle.dumps(tiny_edm_net, protocol=4))
                    if op.name in ("GLOBAL", "STACK_GLOBAL") and arg}
    assert not any("training." in g for g in globals_used)  # Classes are named only inside meta.


def test_iddpm_and_loss_round_trip():
    net = iDDPMPrecond(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                       attn_resolutions=[])
    copy = pickle.loads(pickle.dumps(net))
    assert torch.equal(copy.u, net.u) and copy.sigma_max == net.sigma_max
    loss = pickle.loads(pickle.dumps(EDMLoss(P_mean=-1.0, P_std=1.5)))
    assert isinstance(loss, EDMLoss) and (loss.P_mean, loss.P_std) == (-1.0, 1.5)


def test_unknown_class_is_refused():
    meta = dict(type="class", version=6, module_src="import os; os.system('touch /tmp/pwned')",
                class_name="Evil", state={})
    with pytest.raises(pickle.UnpicklingError, match="unknown persistent class 'Evil'"):
        persistence._reconstruct_persistent_obj(meta)


def test_mismatched_tensors_are_refused(tiny_edm_net):
    _, (meta,) = tiny_edm_net.__reduce__()
    meta["state"]["_init_kwargs"]["model_channels"] = 32  # The constructor no longer matches the tensors.
    with pytest.raises(pickle.UnpicklingError, match="do not match its constructor arguments"):
        persistence._reconstruct_persistent_obj(meta)
