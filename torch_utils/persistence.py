"""Pickling in the official EDM snapshot format, without ever executing code from a pickle.

The official release pickles every network, loss and augmentation object through the reduce function
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` carries the defining
module's source text, the class name and the object's state (its ``__dict__``, which records the
constructor call as ``_init_args`` / ``_init_kwargs``). We write the same format, with a source text that
the official loader can execute (one self-contained text per bundle of modules, see snapshot_source.py), so
official tools open our snapshots with plain ``pickle.load``. We read the format without running
``module_src``: the object is rebuilt as *our* class of the same name, from its constructor call, and its
tensors are loaded with ``strict=True``."""

from __future__ import annotations

import copy
import functools
import importlib
from collections import OrderedDict
from typing import Any, Callable, TypeVar

import torch

from torch_utils.snapshot_source import declare_bundle, module_source  # noqa: F401 (declare_bundle re-exported)

_FORMAT_VERSION = 6
# Our class for each persistent class name. A pickle names a class only by its bare name, so each name may
# mean one class. The official EDM (``training.networks``, ``training.loss``, ``training.augment``) and EDM2
# (``training.networks_edm2``: Precond, UNet, Block, MPConv, MPFourier; ``training.training_loop.EDM2Loss``)
# releases use disjoint names, and so do we: our EDM preconditioners' shared base class, also named ``Precond``,
# is not persistent (only its subclasses are pickled), so 'Precond' means EDM2's.
_registry: dict[str, type] = {}

# The modules that define the classes official pickles name; imported on demand when a class name is not yet known.
# Named as strings so that torch_utils does not import training/ at import time.
_DEFAULT_MODULES = ("training.networks", "training.loss", "training.data.augment", "training.data.encoders")

T = TypeVar("T", bound=type)


def persistent_class(cls: T) -> T:
    """Class decorator: record each instance's constructor call and pickle it in the official format."""
    if cls.__name__ in _registry and _registry[cls.__name__] is not cls:
        raise ValueError(f"persistent class name '{cls.__name__}' is already taken by {_registry[cls.__name__]}")
    _registry[cls.__name__] = cls
    orig_init = cls.__init__

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        # The outermost constructor call is the one recorded; base-class __init__ calls keep it.
        if "_init_kwargs" not in self.__dict__:
            object.__setattr__(self, "_init_args", copy.deepcopy(args))
            object.__setattr__(self, "_init_kwargs", copy.deepcopy(kwargs))
        orig_init(self, *args, **kwargs)

    def __reduce__(self):
        meta = dict(type="class", version=_FORMAT_VERSION, module_src=module_source(type(self).__module__),
                    class_name=type(self).__name__, state=_pickled_state(self))
        return _reconstruct_persistent_obj, (meta,)

    cls.__init__ = __init__
    cls.__reduce__ = __reduce__
    return cls


def _pickled_state(obj: Any) -> dict:
    """What a persistent object's pickle records: its ``__dict__``, or what its class's own ``__getstate__`` returns
    (to leave out what must not be pickled, e.g. a loaded network, as the official persistence also lets a class
    do). torch's ``Module.__getstate__`` is not one of those, so networks are pickled as their ``__dict__``."""
    for cls in type(obj).__mro__:
        if cls in (torch.nn.Module, object):
            break
        if "__getstate__" in vars(cls):
            return dict(obj.__getstate__())
    return dict(obj.__dict__)


def is_persistent(obj: Any) -> bool:
    return type(obj).__name__ in _registry and _registry[type(obj).__name__] is type(obj)


def init_kwargs_of(obj: Any) -> dict:
    """The keyword arguments the object was constructed with (a deep copy)."""
    return copy.deepcopy(obj.__dict__.get("_init_kwargs", {}))


def registered_class(class_name: str) -> type:
    """Our class for an official class name; raises a clear error for unknown names."""
    if class_name not in _registry:
        for module_name in _DEFAULT_MODULES:
            try:
                importlib.import_module(module_name)
            except ImportError:
                pass
    if class_name not in _registry:
        raise pickle_error(f"unknown persistent class '{class_name}' (known: {', '.join(sorted(_registry))})")
    return _registry[class_name]


def pickle_error(message: str) -> Exception:
    import pickle
    return pickle.UnpicklingError(message)


def _collect_tensors(state: dict) -> "OrderedDict[str, torch.Tensor]":
    """The state_dict implied by a pickled module state: its own tensors plus its (rebuilt) children's."""
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            tensors[name] = value.detach()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in (state.get("_non_persistent_buffers_set") or ()):
            tensors[name] = value
    for child_name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, torch.nn.Module):
            raise pickle_error(f"submodule '{child_name}' is a {type(child).__name__}, not a module")
        for name, value in child.state_dict(keep_vars=False).items():
            tensors[f"{child_name}.{name}"] = value
    return tensors


def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Rebuild a pickled persistent object as our class of the same name. Never executes ``module_src``."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle_error("malformed persistent object: expected a dict with type='class' and a state dict")
    cls = registered_class(str(meta.get("class_name")))
    state = meta["state"]
    args = tuple(state.get("_init_args", ()))
    kwargs = dict(state.get("_init_kwargs", {}))
    if not issubclass(cls, torch.nn.Module):
        return cls(*args, **kwargs)
    with torch.device("meta"):
        obj = cls(*args, **kwargs)
    try:
        obj.load_state_dict(_collect_tensors(state), strict=True, assign=True)
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[0]
        raise pickle_error(f"{cls.__name__}: pickled tensors do not match its constructor arguments: {first_line}") from None
    obj.train(bool(state.get("training", False)))
    return obj
