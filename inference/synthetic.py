"""Synthetic brain FLAIR volumes with glioma-like lesions, their masks, findings and reports.

Anatomy comes from the MNI152 2009 templates inside the nilearn wheel (grey matter, white
matter, brain mask; CSF is the remainder), resampled once to a 3 mm template grid and cached.
A case is built in that template space and then "scanned":

- FLAIR-like contrast ``GM*700 + WM*500 + CSF*60`` with per-case contrast variation;
- a lesion (when the case is lesional) placed by lobe and side from MNI coordinates: solid
  tumour, optional necrotic core and enhancing rim, optional FLAIR-hyperintense edema that
  follows the white matter, and mass effect (radial displacement of the anatomy) from which
  ventricular compression and midline shift are *measured*, not drawn at random;
- CSF, skull and scalp shells around the brain, as in an unprocessed clinical FLAIR;
- a random rigid/affine pose, voxel size and slice thickness, a smooth bias field, Rician
  noise and a random global intensity scale.

Healthy controls come from the same generator and the same random draws, without the lesion.
Volumes are returned in RAS world coordinates (``affine`` maps voxel indices to RAS mm).

Lesion mask labels (this project's synthetic convention, close to BraTS): 1 necrosis,
2 edema, 3 non-enhancing solid tumour, 4 enhancing rim.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

from inference.report_schema import NORMAL, Findings, Lobe, Side, Size, render

TEMPLATE_SPACING = 3.0
TEMPLATE_ORIGIN = np.array([-96.0, -132.0, -75.0])
TEMPLATE_SHAPE = (65, 77, 63)
_CACHE_VERSION = 1

NECROSIS, EDEMA, SOLID, ENHANCING = 1, 2, 3, 4
LOBE_CODES = {lobe: code for code, lobe in enumerate(Lobe, start=1)}

#: Lesion core radius (mm) per size class.
SIZE_RADIUS_MM = {Size.SMALL: (6.0, 9.0), Size.MEDIUM: (10.0, 13.5), Size.LARGE: (14.5, 19.0)}
#: Share of lesions drawn with surrounding edema, as in the test sets. Training data may draw more
#: lesions without edema (``edema_probability``): they are the ones a small model misses.
EDEMA_PROBABILITY = 0.85
SIDE_WEIGHTS = {Side.LEFT: 0.42, Side.RIGHT: 0.42, Side.BILATERAL: 0.16}
LOBE_WEIGHTS = {
    Lobe.FRONTAL: 0.3,
    Lobe.PARIETAL: 0.22,
    Lobe.TEMPORAL: 0.22,
    Lobe.OCCIPITAL: 0.13,
    Lobe.CEREBELLUM: 0.13,
}
#: Lobes where a lesion can cross the midline (through the corpus callosum or the vermis).
BILATERAL_LOBES = (Lobe.FRONTAL, Lobe.PARIETAL, Lobe.OCCIPITAL, Lobe.CEREBELLUM)
#: Relative loss of ipsilateral ventricular CSF that counts as compression.
COMPRESSION_THRESHOLD = 0.15
#: Lateral displacement of the midline (mm) that counts as midline shift.
MIDLINE_SHIFT_MM = 3.5
#: Scanner field of view (mm, RAS x y z) the output grid covers.
FIELD_OF_VIEW_MM = np.array([204.0, 234.0, 195.0])


@dataclass(frozen=True)
class Anatomy:
    """Tissue probability maps on the 3 mm template grid (RAS, origin ``TEMPLATE_ORIGIN``)."""

    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray

    @property
    def csf(self) -> np.ndarray:
        return np.clip(self.brain - self.gm - self.wm, 0.0, 1.0)


@dataclass(frozen=True)
class Case:
    """One synthetic study. ``probe_region`` is the lesion plus edema for patients and, for
    controls, the region a lesion drawn with the same parameters would occupy: a matched
    region to mask out when comparing image statistics (the shortcut probe)."""

    case_id: str
    volume: np.ndarray
    affine: np.ndarray
    lesion_mask: np.ndarray
    probe_region: np.ndarray
    findings: Findings
    report: str


def template_affine() -> np.ndarray:
    affine = np.diag([TEMPLATE_SPACING] * 3 + [1.0])
    affine[:3, 3] = TEMPLATE_ORIGIN
    return affine


def _template_world() -> np.ndarray:
    """RAS mm coordinates of every template voxel, shape (3, *TEMPLATE_SHAPE)."""
    axes = [TEMPLATE_ORIGIN[a] + TEMPLATE_SPACING * np.arange(n) for a, n in enumerate(TEMPLATE_SHAPE)]
    return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "brain3d"


@functools.lru_cache(maxsize=1)
def load_anatomy(cache_dir: Path | None = None) -> Anatomy:
    """The MNI152 maps on the template grid, resampled once and cached on disk (offline)."""
    cache = (cache_dir or _default_cache_dir()) / f"mni152_{int(TEMPLATE_SPACING)}mm_v{_CACHE_VERSION}.npz"
    if cache.exists():
        with np.load(cache) as stored:
            return Anatomy(stored["gm"], stored["wm"], stored["brain"])
    from nilearn import datasets

    maps = {}
    world = _template_world().reshape(3, -1)
    for name, loader in (
        ("gm", datasets.load_mni152_gm_template),
        ("wm", datasets.load_mni152_wm_template),
        ("brain", datasets.load_mni152_brain_mask),
    ):
        image = loader(resolution=1)
        to_voxel = np.linalg.inv(image.affine)
        voxel = to_voxel[:3, :3] @ world + to_voxel[:3, 3:4]
        # Average the 1 mm template over each 3 mm cell (prefilter), then sample at the centres.
        data = ndimage.uniform_filter(np.asarray(image.dataobj, dtype=np.float32), size=3)
        maps[name] = (
            ndimage.map_coordinates(data, voxel, order=1, mode="constant").reshape(TEMPLATE_SHAPE).clip(0, 1)
        )
    maps["brain"] = np.maximum(maps["brain"], np.minimum(maps["gm"] + maps["wm"], 1.0))
    anatomy = Anatomy(**{k: v.astype(np.float32) for k, v in maps.items()})
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez_compressed(temporary, gm=anatomy.gm, wm=anatomy.wm, brain=anatomy.brain)
    temporary.replace(cache)
    return anatomy


def lobe_map(world: np.ndarray) -> np.ndarray:
    """A coarse lobe atlas from MNI coordinates (codes of :data:`LOBE_CODES`, 0 elsewhere).

    Boundaries: cerebellum below z=-20 behind y=-45; occipital behind y=-72; temporal below
    z=0 lateral to |x|=28 between y=-72 and 22; frontal in front of a central sulcus that
    tilts back with height (y = -15 - 0.2 z); parietal the rest."""
    x, y, z = world
    lobes = np.full(x.shape, LOBE_CODES[Lobe.PARIETAL], dtype=np.uint8)
    lobes[y > -15 - 0.2 * np.maximum(z, 0)] = LOBE_CODES[Lobe.FRONTAL]
    lobes[(z < 0) & (np.abs(x) > 28) & (y > -72) & (y < 22)] = LOBE_CODES[Lobe.TEMPORAL]
    lobes[y <= -72] = LOBE_CODES[Lobe.OCCIPITAL]
    lobes[(z < -20) & (y < -45)] = LOBE_CODES[Lobe.CEREBELLUM]
    return lobes


def ventricle_box(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Where the lateral ventricles are, in MNI mm: a lesion reaching it compresses them."""
    return (np.abs(x) < 25) & (y > -40) & (y < 25) & (z > 0) & (z < 30)


@functools.lru_cache(maxsize=1)
def _static_maps() -> dict[str, np.ndarray]:
    """Per-template maps every case reuses: world coordinates, lobes, depth, shell distance."""
    anatomy = load_anatomy()
    world = _template_world()
    brain = anatomy.brain > 0.5
    depth_mm = ndimage.distance_transform_edt(brain) * TEMPLATE_SPACING
    head = ndimage.binary_closing(brain, iterations=3)
    head = ndimage.binary_fill_holes(head)
    outside_mm = ndimage.distance_transform_edt(~head) * TEMPLATE_SPACING
    ventricles = ventricle_box(*world)
    return {
        "world": world,
        "lobes": lobe_map(world),
        "depth": depth_mm,
        "outside": outside_mm,
        "ventricles": ventricles,
    }


@dataclass(frozen=True)
class LesionPlan:
    center: np.ndarray  # RAS mm in template space
    radii: np.ndarray  # ellipsoid semi-axes, mm
    rotation: np.ndarray
    side: Side
    lobe: Lobe
    size: Size
    edema_extent: float  # edema reaches this many core radii
    has_edema: bool
    has_necrosis: bool
    has_enhancement: bool


def _random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _pick(rng: np.random.Generator, weights: dict) -> object:
    keys = list(weights)
    return keys[rng.choice(len(keys), p=np.array(list(weights.values())) / sum(weights.values()))]


def plan_lesion(rng: np.random.Generator, edema_probability: float = EDEMA_PROBABILITY) -> LesionPlan:
    """Draw side, lobe, size and composition, then a centre inside that lobe and side.

    ``edema_probability`` changes only which lesions have edema: every other draw, and the random
    stream after it, is the same whatever its value."""
    maps, anatomy = _static_maps(), load_anatomy()
    side = _pick(rng, SIDE_WEIGHTS)
    lobe = (
        BILATERAL_LOBES[rng.integers(len(BILATERAL_LOBES))]
        if side is Side.BILATERAL
        else _pick(rng, LOBE_WEIGHTS)
    )
    size = Size.LARGE if side is Side.BILATERAL and rng.random() < 0.5 else Size(rng.choice(list(Size)))
    if side is Side.BILATERAL and size is Size.SMALL:
        size = Size.MEDIUM
    radius = rng.uniform(*SIZE_RADIUS_MM[size])
    x = maps["world"][0]
    if side is Side.BILATERAL:
        side_ok = np.abs(x) < 4.5
    else:
        margin = radius + 6.0
        side_ok = x < -margin if side is Side.LEFT else x > margin
    in_lobe = (maps["lobes"] == LOBE_CODES[lobe]) & side_ok
    for condition in (
        in_lobe & (anatomy.wm > 0.4) & (maps["depth"] > min(radius, 12.0)),
        in_lobe & (anatomy.brain > 0.5) & (maps["depth"] > 6.0),
        in_lobe & (anatomy.brain > 0.5),
    ):
        candidates = np.argwhere(condition)
        if len(candidates):
            break
    voxel = candidates[rng.integers(len(candidates))]
    center = TEMPLATE_ORIGIN + TEMPLATE_SPACING * voxel + rng.uniform(-1.5, 1.5, 3)
    necrosis_probability = {Size.SMALL: 0.25, Size.MEDIUM: 0.55, Size.LARGE: 0.8}[size]
    has_necrosis = bool(rng.random() < necrosis_probability)
    return LesionPlan(
        center=center,
        radii=radius * rng.uniform(0.8, 1.2, 3),
        rotation=_random_rotation(rng, 180.0),
        side=side,
        lobe=lobe,
        size=size,
        edema_extent=float(rng.uniform(1.7, 2.4)),
        has_edema=bool(rng.random() < edema_probability),
        has_necrosis=has_necrosis,
        has_enhancement=bool(rng.random() < (0.8 if has_necrosis else 0.3)),
    )


def _lesion_fields(plan: LesionPlan, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ellipsoidal radius (1 at the core boundary) and a smooth boundary noise."""
    offset = _static_maps()["world"].reshape(3, -1) - plan.center[:, None]
    local = (plan.rotation.T @ offset) / plan.radii[:, None]
    radius = np.linalg.norm(local, axis=0).reshape(TEMPLATE_SHAPE)
    noise = ndimage.gaussian_filter(rng.standard_normal(TEMPLATE_SHAPE).astype(np.float32), sigma=2.0)
    noise *= 0.12 / max(float(noise.std()), 1e-6)
    return radius + noise, noise


def _mass_effect(plan: LesionPlan, maps: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
    """Radial displacement field (voxels, pull-back form) and the midline's lateral shift (mm)."""
    world = maps["world"]
    offset = world - plan.center[:, None, None, None]
    distance = np.maximum(np.linalg.norm(offset, axis=0), 1e-3)
    core = float(np.mean(plan.radii))
    amplitude = core * (0.45 if plan.has_edema else 0.3)

    def magnitude(r: np.ndarray | float) -> np.ndarray:
        return (
            amplitude
            * np.minimum(np.asarray(r) / core, 1.0)
            * np.exp(-np.maximum(np.asarray(r) - core, 0) / 20.0)
        )

    displacement_mm = offset / distance * magnitude(distance)
    midline_shift = 0.0 if plan.side is Side.BILATERAL else float(magnitude(abs(plan.center[0])))
    return displacement_mm / TEMPLATE_SPACING, midline_shift


def _warp(volume: np.ndarray, displacement_vox: np.ndarray) -> np.ndarray:
    grid = np.indices(TEMPLATE_SHAPE, dtype=np.float32)
    return ndimage.map_coordinates(volume, grid - displacement_vox, order=1, mode="nearest")


def _ventricle_csf(csf: np.ndarray, maps: dict[str, np.ndarray], side: Side) -> float:
    x = maps["world"][0]
    region = maps["ventricles"]
    if side is Side.LEFT:
        region = region & (x < 0)
    elif side is Side.RIGHT:
        region = region & (x > 0)
    return float(csf[region].sum())


def _compose_template_case(
    lesional: bool, rng: np.random.Generator, edema_probability: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Findings]:
    """Image, label mask and probe region on the template grid, plus the findings."""
    anatomy, maps = load_anatomy(), _static_maps()
    # Drawn for controls too: the same random stream, and a matched probe region.
    plan = plan_lesion(rng, edema_probability)
    radius, noise = _lesion_fields(plan, rng)
    edema_reach = plan.edema_extent * (0.75 + 0.35 * anatomy.wm) + noise
    region = (radius < 1.0) | ((edema_reach > radius) & (anatomy.brain > 0.3) if plan.has_edema else False)
    levels = {
        "gm": 700 * rng.uniform(0.9, 1.1),
        "wm": 500 * rng.uniform(0.9, 1.1),
        "csf": 60 * rng.uniform(0.6, 1.4),
    }
    lesion_levels = {
        EDEMA: levels["gm"] * rng.uniform(1.45, 1.65),
        SOLID: levels["gm"] * rng.uniform(1.25, 1.4),
        ENHANCING: levels["gm"] * rng.uniform(1.0, 1.1),
        NECROSIS: levels["gm"] * rng.uniform(0.35, 0.5),
    }
    gm, wm, brain, csf = anatomy.gm, anatomy.wm, anatomy.brain, anatomy.csf
    labels = np.zeros(TEMPLATE_SHAPE, dtype=np.uint8)
    findings = NORMAL
    if lesional:
        displacement, midline_shift = _mass_effect(plan, maps)
        gm, wm, brain = (_warp(m, displacement) for m in (anatomy.gm, anatomy.wm, anatomy.brain))
        csf = np.clip(brain - gm - wm, 0, 1)
        if plan.has_edema:
            labels[region] = EDEMA
        labels[radius < 1.0] = SOLID
        if plan.has_enhancement:
            labels[(radius < 1.0) & (radius > 0.72)] = ENHANCING
        if plan.has_necrosis:
            labels[radius < 0.55] = NECROSIS
        csf_after = np.where(labels > 0, 0.0, csf)
        before = _ventricle_csf(anatomy.csf, maps, plan.side)
        after = _ventricle_csf(csf_after, maps, plan.side)
        findings = Findings(
            abnormal=True,
            side=plan.side,
            lobes=frozenset({plan.lobe}),
            edema=plan.has_edema,
            necrosis=plan.has_necrosis,
            enhancement=plan.has_enhancement,
            ventricular_compression=bool(after < (1 - COMPRESSION_THRESHOLD) * before),
            midline_shift=midline_shift > MIDLINE_SHIFT_MM,
            size=plan.size,
        )
    image = gm * levels["gm"] + wm * levels["wm"] + csf * levels["csf"]
    # Shells outside the brain: CSF, skull (dark bone, faint marrow), scalp (bright fat), skin.
    outside = maps["outside"]
    csf_layer = rng.uniform(2.0, 4.0)
    skull_layer = csf_layer + rng.uniform(4.0, 8.0)
    scalp_layer = skull_layer + rng.uniform(4.0, 8.0)
    shells = np.zeros(TEMPLATE_SHAPE, dtype=np.float32)
    shells[(outside > 0) & (outside <= csf_layer)] = levels["csf"]
    shells[(outside > csf_layer) & (outside <= skull_layer)] = levels["gm"] * rng.uniform(0.05, 0.15)
    shells[(outside > skull_layer) & (outside <= scalp_layer)] = levels["gm"] * rng.uniform(1.0, 1.3)
    image = np.where(outside > 0, shells, image + (1 - brain) * levels["csf"])
    if lesional:
        for label, level in lesion_levels.items():
            weight = ndimage.gaussian_filter((labels == label).astype(np.float32), sigma=0.6)
            image = image * (1 - weight) + level * weight
    return image.astype(np.float32), labels, region, findings


def _scanner_pose(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Template-to-scanner transform (rotation, scaling, translation) and the output affine."""
    pose = np.eye(4)
    pose[:3, :3] = _random_rotation(rng, 8.0) @ np.diag(rng.uniform(0.93, 1.07, 3))
    pose[:3, 3] = rng.uniform(-8.0, 8.0, 3) + np.array(
        [0.0, 18.0, -12.0]
    )  # brain centre (MNI 0, -18, 12) to the origin
    in_plane = rng.uniform(2.6, 3.4)
    spacing = np.array([in_plane, in_plane, rng.uniform(2.8, 4.2)])
    shape = np.ceil(FIELD_OF_VIEW_MM / spacing).astype(int)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(shape - 1) / 2 * spacing
    return pose, affine


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    axes = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    terms = [*axes, *(a * a for a in axes), axes[0] * axes[1], axes[1] * axes[2], axes[0] * axes[2]]
    log_field = sum(rng.normal(0, 0.08) * term for term in terms)
    return np.exp(log_field).astype(np.float32)


def synthesize_case(
    case_id: str,
    lesional: bool,
    seed: int | tuple[int, ...],
    edema_probability: float = EDEMA_PROBABILITY,
) -> Case:
    """One case, fully determined by ``seed`` (a numpy seed or seed sequence entropy) and
    ``edema_probability`` (see :func:`plan_lesion`)."""
    rng = np.random.default_rng(seed)
    image, labels, region, findings = _compose_template_case(lesional, rng, edema_probability)
    pose, affine = _scanner_pose(rng)
    shape = tuple(np.ceil(FIELD_OF_VIEW_MM / np.diag(affine)[:3]).astype(int))
    # output voxel -> scanner mm -> template mm -> template voxel
    mapping = np.linalg.inv(template_affine()) @ np.linalg.inv(pose) @ affine
    resample = functools.partial(
        ndimage.affine_transform, matrix=mapping[:3, :3], offset=mapping[:3, 3], output_shape=shape
    )
    volume = resample(image, order=1, mode="constant", cval=0.0)
    lesion_mask = resample(labels, order=0, mode="constant", cval=0).astype(np.uint8)
    probe_region = resample(region.astype(np.uint8), order=0, mode="constant", cval=0).astype(bool)
    volume *= _bias_field(volume.shape, rng) * rng.uniform(0.5, 3.0)
    sigma = rng.uniform(0.015, 0.04) * float(np.percentile(volume[volume > 0], 90))
    volume = np.sqrt((volume + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    report_rng = random.Random(int(rng.integers(2**62)))
    return Case(
        case_id=case_id,
        volume=volume.astype(np.float32),
        affine=affine,
        lesion_mask=lesion_mask,
        probe_region=probe_region,
        findings=findings,
        report=render(findings, report_rng),
    )


def lesional_flags(cases: int, seed: int, lesional_fraction: float = 0.7) -> np.ndarray:
    """Exactly ``round(cases * fraction)`` lesional cases, in a seeded order."""
    flags = np.zeros(cases, dtype=bool)
    flags[: round(cases * lesional_fraction)] = True
    return np.random.default_rng([seed, 0xF1A6]).permutation(flags)


def case_plans(
    cases: int,
    seed: int,
    lesional_fraction: float = 0.7,
    edema_probability: float = EDEMA_PROBABILITY,
) -> list[tuple[str, bool, tuple[int, int], float]]:
    """The arguments of :func:`synthesize_case` for each case of one seed, in order. Which cases are
    lesional is a seeded permutation over all ``cases`` (exactly the fraction asked for); given that
    flag, case ``i`` depends only on (seed, i). A set of another size from the same seed is
    therefore a different set."""
    flags = lesional_flags(cases, seed, lesional_fraction)
    return [
        (f"syn-{seed}-{index:05d}", bool(flags[index]), (seed, index), edema_probability)
        for index in range(cases)
    ]


def generate_cases(cases: int, seed: int, lesional_fraction: float = 0.7) -> Iterator[Case]:
    """``cases`` cases of one seed (see :func:`case_plans`)."""
    for plan in case_plans(cases, seed, lesional_fraction):
        yield synthesize_case(*plan)


class SeriesWriter(Protocol):
    """Writes a volume as a DICOM series into a folder (the node's ``write_series``)."""

    def __call__(self, out_dir: Path, volume: np.ndarray, affine: np.ndarray, **options: Any) -> object: ...


def write_dataset(
    out_dir: str | Path,
    cases: int,
    seed: int,
    file_format: str = "nifti",
    lesional_fraction: float = 0.7,
    series_writer: SeriesWriter | None = None,
) -> Path:
    """Write ``cases`` cases under ``out_dir/cases/<id>/`` and ``out_dir/manifest.jsonl``.

    NIfTI cases are ``flair.nii.gz``; DICOM cases are a FLAIR series written by
    ``series_writer`` (this package knows volumes, not DICOM: ``brain3d synth`` passes the
    node's writer) in a random plane (axial, sagittal, coronal), obliquity and slice order.
    Every case also gets ``seg.nii.gz`` (labels of this module's docstring)."""
    import nibabel as nib

    from inference.dataset import assign_splits, stratum, write_manifest
    from inference.report_schema import findings_from_dict, findings_to_dict

    if file_format not in ("nifti", "dicom"):
        raise ValueError(f"format must be nifti or dicom, got {file_format!r}")
    write_dicom = series_writer if file_format == "dicom" else None
    if file_format == "dicom" and write_dicom is None:
        raise ValueError("DICOM cases need a series writer (brain3d synth passes the node's)")
    out = Path(out_dir)
    entries = []
    for case in generate_cases(cases, seed, lesional_fraction):
        folder = out / "cases" / case.case_id
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(case.lesion_mask, case.affine), folder / "seg.nii.gz")
        entry = {
            "id": case.case_id,
            "subject": case.case_id,
            "source": "synthetic",
            "seed": seed,
            "report": case.report,
            "findings": findings_to_dict(case.findings),
            "seg": f"cases/{case.case_id}/seg.nii.gz",
        }
        if write_dicom is None:
            nib.save(nib.Nifti1Image(case.volume, case.affine), folder / "flair.nii.gz")
            entry.update(path=f"cases/{case.case_id}/flair.nii.gz", format="nifti")
        else:
            rng = np.random.default_rng([seed, int(case.case_id.rsplit("-", 1)[1]), 0xD1C0])
            orientation = str(rng.choice(["axial", "sagittal", "coronal"]))
            write_dicom(
                folder / "dicom",
                np.round(case.volume / case.volume.max() * 4000).astype(np.uint16),
                case.affine,
                orientation=orientation,
                oblique_degrees=float(rng.uniform(0, 15)),
                reverse_slices=bool(rng.random() < 0.5),
                patient_id=case.case_id,
                patient_name="Synthetic^Case",
                seed=int(rng.integers(2**31)),
            )
            entry.update(path=f"cases/{case.case_id}/dicom", format="dicom", orientation=orientation)
        entries.append(entry)
    splits = assign_splits(
        [e["subject"] for e in entries],
        [stratum(findings_from_dict(e["findings"])) for e in entries],
        seed,
    )
    for entry in entries:
        entry["split"] = splits[entry["subject"]]
    write_manifest(out / "manifest.jsonl", entries)
    return out / "manifest.jsonl"
