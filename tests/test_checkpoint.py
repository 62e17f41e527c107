"""The network loader: official-format pickles, our snapshots, safetensors, URLs; and refusal of hostile pickles."""

from __future__ import annotations

import functools
import http.server
import io
import os
import pickle
import threading

import numpy as np
import pytest
import torch

from conftest import (_OfficialPersistentObject, as_official, build_official_case, make_tiny_net,
                      official_snapshot_bytes)
from training.checkpoint import (SafeUnpickler, UnresolvedObject, UnsafePickleError, export_safetensors, load_network,
                                 load_network_pkl, save_network_pkl)
from training.loss import EDMLoss

pytestmark = pytest.mark.usefixtures("single_thread")


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _referenced_globals(data: bytes) -> set[str]:
    """module.name of every global a pickle references (recorded while our safe unpickler reads it)."""
    found = set()

    class Recorder(SafeUnpickler):
        def find_class(self, module, name):
            found.add(f"{module}.{name}")
            return super().find_class(module, name)

    Recorder(io.BytesIO(data)).load()
    return found


def _outputs(net, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution], generator=g)
    labels = torch.eye(net.label_dim)[[0, 1]] if net.label_dim else None
    with torch.no_grad():
        return net(x, torch.tensor([0.5, 3.0]), labels)

# ----------------------------------------------------------------------------
# Official-format pickles.


def test_official_format_pickle_loads_into_our_classes(official_vectors, tmp_path):
    """The official vectors' network, pickled as the official release pickles it (with a module_src that would
    abort if it were run), loads as our EDMPrecond and computes the official D."""
    case = official_vectors["EDMPrecond-DDPM++-cond"]
    data = official_snapshot_bytes(build_official_case(case), loss_fn=EDMLoss(P_mean=-1.0),
                                   dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset",
                                                       path="cifar10-32x32.zip", resolution=np.int64(16),
                                                       max_size=np.int64(50000), xflip=False))
    # The same globals as the official pickles reference (spec README), nothing more.
    assert _referenced_globals(data) <= {
        "torch_utils.persistence._reconstruct_persistent_obj", "collections.OrderedDict",
        "torch._utils._rebuild_parameter", "torch._utils._rebuild_tensor_v2", "torch.storage._load_from_bytes",
        "torch.nn.modules.container.ModuleDict", "numpy.dtype", "numpy._core.multiarray.scalar",
        "numpy.core.multiarray.scalar"}
    assert "torch.nn.modules.container.ModuleDict" in _referenced_globals(data)

    snapshot = load_network_pkl(_write(tmp_path / "edm-official.pkl", data))
    net = snapshot["ema"]
    assert type(net).__name__ == "EDMPrecond" and type(net.model.enc).__name__ == "ModuleDict"
    assert type(net.model.enc["16x16_block0"]).__name__ == "UNetBlock"
    with torch.no_grad():
        D = net(case["x"], case["sigma"], case["class_labels"], **case["model_kwargs"])
    torch.testing.assert_close(D, case["D"], rtol=1e-5, atol=1e-5)
    assert snapshot["loss_fn"].P_mean == -1.0 and snapshot["augment_pipe"] is None
    assert snapshot["dataset_kwargs"]["max_size"] == 50000


def test_module_src_is_never_executed(tmp_path):
    marker = tmp_path / "module_src_ran"
    module_src = f"open({str(marker)!r}, 'w').write('ran')\n"
    net = make_tiny_net()
    loaded = load_network(_write(tmp_path / "net.pkl", official_snapshot_bytes(net, module_src=module_src)))
    assert not marker.exists()
    assert torch.equal(_outputs(loaded), _outputs(net))


def test_unknown_auxiliary_object_does_not_block_the_network(tmp_path):
    """An augmentation pipe (not a module) of a class we lack becomes an UnresolvedObject; the network loads."""
    pipe = _OfficialPersistentObject(dict(type="class", version=6, module_src="", class_name="FancyAugmentPipe",
                                          state=dict(_init_args=(), _init_kwargs=dict(p=0.12))))
    snapshot = load_network_pkl(_write(tmp_path / "net.pkl", official_snapshot_bytes(make_tiny_net(),
                                                                                       augment_pipe=pipe)))
    assert isinstance(snapshot["augment_pipe"], UnresolvedObject)
    assert snapshot["augment_pipe"].init_kwargs == dict(p=0.12)
    with pytest.raises(RuntimeError, match="FancyAugmentPipe could not be rebuilt"):
        snapshot["augment_pipe"](torch.zeros(1))


def test_tensors_that_do_not_fit_the_constructor_are_refused(tmp_path):
    net = make_tiny_net()
    wrapped = as_official(net)
    wrapped.meta["state"]["_init_kwargs"] = dict(wrapped.meta["state"]["_init_kwargs"], model_channels=16)
    path = _write(tmp_path / "bad.pkl", pickle.dumps(dict(ema=wrapped, loss_fn=None, augment_pipe=None,
                                                          dataset_kwargs={}), protocol=4))
    with pytest.raises(pickle.UnpicklingError, match="EDMPrecond: pickled tensors do not match"):
        load_network_pkl(path)

# ----------------------------------------------------------------------------
# Hostile pickles are refused and run nothing.


class _CallsGlobal:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_pickle_calling_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = dict(ema=_CallsGlobal(os.system, f"touch {marker}"), loss_fn=None, augment_pipe=None,
                   dataset_kwargs=None)
    path = _write(tmp_path / "evil.pkl", pickle.dumps(payload, protocol=4))
    with pytest.raises(UnsafePickleError) as info:
        load_network_pkl(path)
    message = str(info.value)
    assert f"'{os.system.__module__}.system'" in message and "evil.pkl" in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("function", [eval, exec, getattr, __import__, torch.load, np.load, io.open],
                         ids=lambda f: f.__name__)
def test_other_dangerous_globals_are_refused(function, tmp_path):
    path = _write(tmp_path / "evil.pkl", pickle.dumps(dict(ema=_CallsGlobal(function, "0")), protocol=4))
    with pytest.raises(UnsafePickleError, match="refusing to load"):
        load_network_pkl(path)


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_tensor_storage_bytes_are_not_unpickled_freely(tmp_path):
    """torch.storage._load_from_bytes is allowed, but its bytes are read with torch's weights-only unpickler:
    a storage that hides an arbitrary pickle is refused."""
    marker = tmp_path / "pwned"
    hidden = io.BytesIO()
    torch.save(_Evil(f"touch {marker}"), hidden, _use_new_zipfile_serialization=False)
    payload = dict(ema=_CallsGlobal(torch.storage._load_from_bytes, hidden.getvalue()))
    path = _write(tmp_path / "evil.pkl", pickle.dumps(payload, protocol=4))
    with pytest.raises(UnsafePickleError, match="tensor storage holds more than tensor data"):
        load_network_pkl(path)
    assert not marker.exists()


def test_unknown_persistent_network_class_is_named(tmp_path):
    obj = _OfficialPersistentObject(dict(type="class", version=6, module_src="", class_name="MysteryUNet",
                                         state=dict(_parameters={}, _buffers={}, _modules={}, _init_args=(),
                                                    _init_kwargs={})))
    path = _write(tmp_path / "x.pkl", pickle.dumps(dict(ema=obj), protocol=4))
    with pytest.raises(pickle.UnpicklingError, match="unknown persistent class 'MysteryUNet'"):
        load_network_pkl(path)


def test_files_that_are_not_snapshots_get_a_clear_error(tmp_path):
    torch.save({"net": 1}, tmp_path / "training-state-000000.pt")
    with pytest.raises(ValueError, match="torch.save archive"):
        load_network_pkl(str(tmp_path / "training-state-000000.pt"))
    with pytest.raises(ValueError, match="expected a snapshot dict"):
        load_network_pkl(_write(tmp_path / "d.pkl", pickle.dumps(dict(a=1), protocol=4)))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_network_pkl(str(tmp_path / "missing.pkl"))

# ----------------------------------------------------------------------------
# Round trips: our snapshots, safetensors, URLs.


def test_our_snapshot_round_trip(tmp_path):
    net = make_tiny_net()
    path = str(tmp_path / "network-snapshot-000000.pkl")
    save_network_pkl(path, dict(ema=net, loss_fn=EDMLoss(), augment_pipe=None,
                                dataset_kwargs=dict(resolution=np.int64(8))))
    snapshot = load_network_pkl(path, device="cpu")
    assert torch.equal(_outputs(snapshot["ema"]), _outputs(net))
    assert isinstance(snapshot["loss_fn"], EDMLoss) and snapshot["dataset_kwargs"] == dict(resolution=8)
    assert not load_network(path).training


def test_safetensors_round_trip(tmp_path):
    net = make_tiny_net()
    path = str(tmp_path / "net.safetensors")
    export_safetensors(net, path, dataset_kwargs=dict(resolution=np.int64(8)))
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        assert b'"edm_network"' in f.read(header_size)  # The config lives in the JSON header, not in a pickle.
    snapshot = load_network_pkl(path)
    assert type(snapshot["ema"]) is type(net) and snapshot["dataset_kwargs"] == dict(resolution=8)
    assert torch.equal(_outputs(snapshot["ema"]), _outputs(net))


def test_load_from_url_is_cached(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    net = make_tiny_net()
    save_network_pkl(str(served / "net.pkl"), dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("EDM_CACHE_DIR", str(tmp_path / "cache"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/net.pkl"
        assert torch.equal(_outputs(load_network(url)), _outputs(net))
        os.remove(served / "net.pkl")  # The second load must come from the cache.
        assert torch.equal(_outputs(load_network(url)), _outputs(net))
    finally:
        server.shutdown()


def test_readme_python_example_runs_as_written_on_this_device(tmp_path, monkeypatch):
    """The README's 'From Python' block, verbatim: the bare pretrained name becomes its official URL (served here
    from a local stand-in network) and the device is whatever this machine has."""
    import re

    from conftest import REPO_ROOT, serve_every_url_from
    from training.checkpoint import PRETRAINED_URL, resolve_network_path

    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    block = re.search(r"From Python, the same images:\n\n```python\n(.*?)```", readme, re.S).group(1)
    stand_in = str(tmp_path / "stand-in.pkl")
    requested = serve_every_url_from(monkeypatch, stand_in)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert requested == [PRETRAINED_URL + "edm-cifar10-32x32-cond-vp.pkl"]
    assert namespace["images"].shape == (16, 3, 32, 32) and namespace["images"].dtype == torch.uint8
    assert resolve_network_path("baseline-cifar10-32x32-uncond-vp.pkl") == \
        PRETRAINED_URL + "baseline/baseline-cifar10-32x32-uncond-vp.pkl"
    assert resolve_network_path(stand_in) == stand_in and resolve_network_path("my-net.pkl") == "my-net.pkl"
