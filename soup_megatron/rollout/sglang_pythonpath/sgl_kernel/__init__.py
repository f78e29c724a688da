"""Stand-in for SGLang's CPU kernel package `sgl_kernel` (not on any index): imports succeed, calls
fail loudly and are logged to $SOUP_SGL_KERNEL_LOG (see README.md one folder up)."""

import importlib.abc
import importlib.machinery
import os
import sys
import types

__version__ = "0.0.0+soup-standin"


class StandInKernel:
    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        log = os.environ.get("SOUP_SGL_KERNEL_LOG")
        if log:
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(f"{self.name} called (pid {os.getpid()})\n")
        raise NotImplementedError(
            f"{self.name}: the sgl_kernel stand-in has no kernels; this SGLang code path needs the real "
            "sgl_kernel CPU build (not installable here), so it cannot run on this machine")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return StandInKernel(f"{self.name}.{attr}")


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return StandInKernel(f"{self.__name__}.{attr}")


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import sgl_kernel.anything` gives another stand-in module."""

    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _SubmoduleFinder())
sys.modules[__name__].__class__ = _StandInModule
