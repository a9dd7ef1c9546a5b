"""Make sure Slicer's Python has what CT-FM needs, asking the user before installing.

PyTorch comes through the PyTorch extension (``PyTorchUtils``), which picks
the build matching the computer's GPU driver; the few pure-Python packages
listed in ``Resources/requirements-slicer.txt`` come from pip.
numpy and SimpleITK ship with Slicer and are never installed here: a second
SimpleITK would shadow Slicer's own. What only ``ctfm`` child processes import
(``Resources/requirements-child.txt``: highdicom and the pydicom 3 it needs, which
must not replace the pydicom 2.4 of Slicer 5.6-5.10) goes into a private folder,
:func:`child_site`, that only those children put on their path.

The checks (:func:`read_requirements`, :func:`missing_requirements`,
:func:`installed_torch_version`) read package metadata only, without
importing anything heavy; :func:`ensure_dependencies` needs a running Slicer.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from pathlib import Path
from typing import Iterable, Optional

# Installed layout: qt-scripted-modules/{CTFMSlicer, Resources}; source tree: CTFM/{CTFMSlicer, Resources}.
REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements-slicer.txt"
# What only `ctfm` children import (DICOM writers): installed into child_site(), never into Slicer's Python.
CHILD_REQUIREMENTS_FILE = REQUIREMENTS_FILE.with_name("requirements-child.txt")
MINIMUM_TORCH = "2.1"  # as pyproject.toml
NEVER_INSTALL = {"simpleitk", "numpy", "torch", "vtk"}


class DependencyError(RuntimeError):
    """A required package is missing and was not (or could not be) installed."""


def read_requirements(path=REQUIREMENTS_FILE) -> list:
    """Requirement strings of a requirements file (comments, blank lines and pip options skipped)."""
    requirements = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirements.append(line)
    return requirements


def child_site() -> Path:
    """The private folder of the packages only ``ctfm`` child processes import (``requirements-child.txt``),
    per Python version; :class:`CTFMSlicer.process.ProcessRunner` puts it first on a child's path when it exists."""
    from CTFMLib.cache import ctfm_home

    return ctfm_home() / f"child-site-py{sys.version_info.major}{sys.version_info.minor}"


def missing_child_requirements(requirements: Iterable[str], site=None) -> list:
    """The requirements not satisfied by the distributions installed in ``site`` (default :func:`child_site`),
    read from their metadata there: what Slicer's own Python has does not count."""
    site = Path(site) if site is not None else child_site()
    installed = {}
    if site.is_dir():
        for dist in importlib.metadata.distributions(path=[str(site)]):
            name = (dist.metadata["Name"] or "").lower().replace("_", "-")
            installed[name] = dist.version
    missing = []
    for text in requirements:
        requirement = _parse(text)
        version = installed.get(requirement.name.lower().replace("_", "-"))
        if version is None or (requirement.specifier and not requirement.specifier.contains(version, prereleases=True)):
            missing.append(text)
    return missing


def child_install_arguments(missing: list, site) -> list:
    """pip's arguments that put ``missing`` into ``site`` without their dependencies (Slicer's own numpy, pillow,
    packaging and typing-extensions serve them)."""
    return ["--target", str(site), "--no-deps", "--upgrade", *missing]


def ensure_child_packages(ask_confirmation: bool = True, requirements_path=CHILD_REQUIREMENTS_FILE, site=None,
                          install=None) -> None:
    """Install the packages of ``requirements-child.txt`` that neither Slicer's Python nor :func:`child_site` has
    into the site; ``install(args)``
    runs pip with those arguments (default ``slicer.util.pip_install``, which takes a list from 5.6 to main)."""
    site = Path(site) if site is not None else child_site()
    requirements = read_requirements(requirements_path)
    # A child imports Slicer's packages too: the site needs only what neither holds (Slicer main bundles
    # pydicom 3, so there only highdicom and pyjpegls go into the site).
    missing = [r for r in missing_child_requirements(requirements, site) if missing_requirements([r])]
    if not missing:
        return
    if install is None:
        import slicer

        if ask_confirmation and not slicer.util.confirmOkCancelDisplay(
            "CT-FM writes DICOM objects with these Python packages, which will be installed now into its own "
            f"folder ({site}), apart from Slicer's:\n\n" + "\n".join(missing),
            "CT-FM - Install Python packages",
        ):
            raise DependencyError("installation of CT-FM's DICOM packages was declined")
        install = slicer.util.pip_install
    site.mkdir(parents=True, exist_ok=True)
    install(child_install_arguments(missing, site))


def _parse(requirement: str):
    from packaging.requirements import Requirement  # bundled with Slicer (pip depends on it)

    return Requirement(requirement)


def missing_requirements(requirements: Iterable[str]) -> list:
    """The requirements not satisfied by installed distributions (by metadata; nothing is imported)."""
    missing = []
    for text in requirements:
        requirement = _parse(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            missing.append(text)
    return missing


def installed_torch_version() -> Optional[str]:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_is_sufficient(version: Optional[str] = None, minimum: str = MINIMUM_TORCH) -> bool:
    from packaging.version import Version

    version = version if version is not None else installed_torch_version()
    if version is None:
        return False
    return Version(version.split("+", 1)[0]) >= Version(minimum)


def ensure_torch(ask_confirmation: bool = True, minimum: str = MINIMUM_TORCH) -> None:
    """Install PyTorch through the PyTorch extension unless a recent enough one is present."""
    if torch_is_sufficient(minimum=minimum):
        return
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise DependencyError(
            "CT-FM needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, restart Slicer, and try again"
        ) from None
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    installed = installed_torch_version()
    if installed is not None:
        raise DependencyError(
            f"PyTorch {installed} is too old for CT-FM (needs >= {minimum}); "
            f"reinstall it in the 'PyTorch Utils' module with version requirement '>={minimum}'"
        )
    logging.info("CT-FM: installing PyTorch (this can take several minutes)")
    if torch_logic.installTorch(askConfirmation=ask_confirmation, torchVersionRequirement=f">={minimum}") is None:
        raise DependencyError("PyTorch was not installed; CT-FM cannot run without it")


def ensure_packages(requirements: list, ask_confirmation: bool = True) -> None:
    """pip-install the missing ones among ``requirements`` (never torch, numpy or SimpleITK)."""
    forbidden = [r for r in requirements if _parse(r).name.lower() in NEVER_INSTALL]
    if forbidden:
        raise DependencyError(f"refusing to pip-install {forbidden}: Slicer or the PyTorch extension provides them")
    missing = missing_requirements(requirements)
    if not missing:
        return
    import slicer

    slicer_packaging = _slicer_packaging()
    if slicer_packaging is not None:
        # None of safetensors' and huggingface_hub's dependencies is Slicer's (numpy, SimpleITK, VTK) or
        # torch, so plain pip_ensure is right (its skip_packages is "a discouraged workaround").
        slicer_packaging.pip_ensure([_parse(r) for r in missing], prompt_install=ask_confirmation, requester="CT-FM")
        return
    if ask_confirmation and not slicer.util.confirmOkCancelDisplay(
        "CT-FM needs these Python packages, which will be installed now:\n\n" + "\n".join(missing),
        "CT-FM - Install Python packages",
    ):
        raise DependencyError("installation of CT-FM's Python packages was declined")
    slicer.util.pip_install(" ".join(missing))


def _slicer_packaging():
    """``slicer.packaging`` (with ``pip_ensure``: Slicer 5.12 and later), or ``None`` on older Slicer, where
    a confirmation and ``slicer.util.pip_install`` do the same."""
    try:
        from slicer import packaging
    except ImportError:
        return None
    return packaging if hasattr(packaging, "pip_ensure") else None


def ensure_dependencies(ask_confirmation: bool = True, requirements_path=REQUIREMENTS_FILE) -> None:
    """PyTorch (via the PyTorch extension), then the packages of ``requirements-slicer.txt``. What only DICOM
    writing children use comes with :func:`ensure_child_packages`, asked for by the jobs that write DICOM."""
    ensure_torch(ask_confirmation)
    ensure_packages(read_requirements(requirements_path), ask_confirmation)
