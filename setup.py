"""Builds the compiled parts of lolakernels through CMake.

`lolakernels._C` (CPU) is always built. `lolakernels._cuda` is built when nvcc is found;
`LOLA_BUILD_CUDA=1` makes it mandatory, `LOLA_BUILD_CUDA=0` skips it. With the variable unset a
failing CUDA build prints a warning and the package installs without it (CPU, Triton and
reference backends still work).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str, cmake_option: str, optional: bool = False) -> None:
        super().__init__(name, sources=[])
        self.cmake_option = cmake_option
        self.optional = optional


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if candidate and Path(candidate).exists():
            return candidate
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return None


def _cuda_request() -> str:
    """'on', 'off' or 'auto' from LOLA_BUILD_CUDA."""
    value = os.environ.get("LOLA_BUILD_CUDA", "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return "on"
    if value in ("0", "off", "false", "no"):
        return "off"
    return "auto"


class CMakeBuild(build_ext):
    def run(self) -> None:
        request = _cuda_request()
        nvcc = _find_nvcc()
        for ext in list(self.extensions):
            if ext.cmake_option != "LOLA_WITH_CUDA":
                continue
            if request == "off" or (request == "auto" and nvcc is None):
                reason = "LOLA_BUILD_CUDA=0" if request == "off" else "nvcc not found"
                print(f"lolakernels: skipping the CUDA extension ({reason})")
                self.extensions.remove(ext)
            elif request == "on" and nvcc is None:
                raise RuntimeError("LOLA_BUILD_CUDA=1 but nvcc was not found (set CUDACXX or CUDA_HOME)")
            else:
                ext.optional = request == "auto"
                ext.nvcc = nvcc
        super().run()

    def build_extension(self, ext: CMakeExtension) -> None:
        try:
            self._cmake_build(ext)
        except (subprocess.CalledProcessError, OSError) as error:
            if not ext.optional:
                raise
            print(f"lolakernels: WARNING: the CUDA extension failed to build ({error}); "
                  "installing without it. Set LOLA_BUILD_CUDA=1 to make this an error.")
            self.extensions.remove(ext)

    def _cmake_build(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name.split(".")[-1]
        build_dir.mkdir(parents=True, exist_ok=True)
        with_cuda = ext.cmake_option == "LOLA_WITH_CUDA"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DLOLA_WITH_CPU={'OFF' if with_cuda else 'ON'}",
            f"-DLOLA_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={ext.nvcc}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    ext_modules=[
        CMakeExtension("lolakernels._C", "LOLA_WITH_CPU"),
        CMakeExtension("lolakernels._cuda", "LOLA_WITH_CUDA", optional=True),
    ],
    cmdclass={"build_ext": CMakeBuild},
)
