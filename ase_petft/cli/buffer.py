"""``petft buffer {info,export,import,recover}``: look into, move and rescue labels."""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
from typing import Any, Dict, List

import numpy as np

from ._common import EXIT_OK, UsageError, existing_file, file_size, memory_buffer


def add_parser(sub) -> None:
    p = sub.add_parser(
        "buffer", help="inspect a label buffer, export or import labels",
        description="Label buffers (.h5) hold reference labels with their provenance. "
        "'info' summarises one, 'export' writes extended XYZ for metatrain, 'import' "
        "adds labels from any file ASE reads.",
    )
    action = p.add_subparsers(dest="action", metavar="ACTION")
    action.required = True

    info = action.add_parser("info", help="counts per variant, elements, sizes, provenance",
                             description="Summarise a label buffer: labels per variant, "
                             "held-out labels, elements, structure sizes, reference "
                             "calculators and recorded failures.")
    info.add_argument("file", metavar="FILE", help="label buffer (.h5)")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=run_info)

    export = action.add_parser("export", help="write labels as extended XYZ",
                               description="Write the labels of one variant as extended "
                               "XYZ with metatrain's keys: info 'energy' (eV), arrays "
                               "'forces' (eV/Å), info 'stress' (eV/Å³).")
    export.add_argument("file", metavar="FILE", help="label buffer (.h5)")
    export.add_argument("-o", "--output", required=True, metavar="LABELS.xyz")
    export.add_argument("--variant", default=None,
                        help="variant to export (needed when the buffer holds several)")
    export.set_defaults(func=run_export)

    imp = action.add_parser("import", help="add labelled structures from files ASE reads",
                            description="Add labelled structures (energies, forces, stress "
                            "on the structures, e.g. extended XYZ, .traj, ASE database) to "
                            "a buffer, created if needed. Every input is validated before "
                            "anything is written.")
    imp.add_argument("inputs", nargs="+", metavar="INPUT", help="files ase.io.read reads")
    imp.add_argument("-o", "--output", required=True, metavar="FILE", help="label buffer (.h5)")
    imp.add_argument("--variant", required=True, help="variant of these labels, e.g. energy/pbe0")
    imp.add_argument("--index", default=":", help="ASE index of the frames (default ':')")
    imp.add_argument("--energy-key", default=None, help="atoms.info key holding the energy")
    imp.add_argument("--forces-key", default=None, help="atoms.arrays key holding forces")
    imp.add_argument("--stress-key", default=None, help="atoms.info key holding the stress")
    imp.add_argument("--keep-duplicates", action="store_true",
                     help="also import frames identical to labels already in the buffer "
                     "(skipped by default, so importing a file twice adds nothing)")
    imp.add_argument("--allow-missing-forces", action="store_true",
                     help="accept labels without forces (only when creating the buffer)")
    imp.set_defaults(func=run_import)

    rec = action.add_parser("recover", help="copy the intact frames of a damaged buffer",
                            description="Copy every frame of a damaged label buffer whose "
                            "checksum holds into a new buffer (the damaged file is only "
                            "read). Train on the new one.")
    rec.add_argument("file", metavar="FILE", help="damaged label buffer (.h5)")
    rec.add_argument("-o", "--output", required=True, metavar="NEW.h5",
                     help="new label buffer (must not exist)")
    rec.set_defaults(func=run_recover)


# ---------------------------------------------------------------------- info
def buffer_summary(path: pathlib.Path) -> Dict[str, Any]:
    """Everything ``petft buffer info`` shows, as plain data."""
    from ..buffer import LabelBuffer

    with LabelBuffer(path, mode="r") as buffer:
        variants = {v: _variant_summary(buffer.frames(variant=v)) for v in buffer.variants}
        failures = buffer.failures()
        summary = {
            "file": str(path), "size": file_size(path), "n_labels": len(buffer),
            "variants": variants,
            "elements": sorted({s for v in variants.values() for s in v["elements"]},
                               key=_atomic_number),
            "allowed_elements": list(buffer.allowed_elements or []) or None,
            "require_forces": buffer.require_forces,
            "failures": _failure_summary(failures),
        }
    return summary


def _atomic_number(symbol: str) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers.get(symbol, 0)


def _variant_summary(frames) -> Dict[str, Any]:
    sizes, elements, refs = [], set(), collections.Counter()
    counts = collections.Counter()
    first = last = None
    for atoms in frames:
        sizes.append(len(atoms))
        elements.update(atoms.get_chemical_symbols())
        refs[_reference_name(atoms.info)] += 1
        results = atoms.calc.results if atoms.calc is not None else {}
        counts["forces"] += "forces" in results
        counts["stress"] += "stress" in results
        counts["periodic"] += bool(atoms.pbc.all())
        counts["holdout"] += bool(atoms.info.get("holdout"))
        stamp = atoms.info.get("appended_at")
        if stamp:
            first = stamp if first is None else min(first, stamp)
            last = stamp if last is None else max(last, stamp)
    return {
        "n_labels": len(sizes), "n_holdout": counts["holdout"],
        "atoms_per_frame": _size_stats(sizes), "n_atoms_total": int(sum(sizes)),
        "with_forces": counts["forces"], "with_stress": counts["stress"],
        "periodic": counts["periodic"], "elements": sorted(elements, key=_atomic_number),
        "references": dict(refs.most_common()), "first_appended": first,
        "last_appended": last,
    }


def _reference_name(info) -> str:
    from .._provenance import level_of_theory

    if info.get("reference"):
        level = level_of_theory(info.get("reference_parameters"))
        return f"{info['reference']} ({level})" if level else str(info["reference"])
    if info.get("source"):  # imported from a file: no reference recorded
        return f"imported from {pathlib.Path(str(info['source'])).name}"
    return "unknown"


def _size_stats(sizes: List[int]) -> Dict[str, float]:
    if not sizes:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": int(min(sizes)), "median": float(np.median(sizes)), "max": int(max(sizes))}


def _failure_summary(failures) -> Dict[str, Any]:
    types = collections.Counter(str(a.info.get("error_type") or "error") for a in failures)
    last = " ".join(str(failures[-1].info.get("error", "")).split())[:200] if failures else None
    return {"n_failures": len(failures), "error_types": dict(types.most_common()),
            "last_error": last}


def format_summary(summary: Dict[str, Any]) -> str:
    variants = summary["variants"]
    lines = [f"{summary['file']}: {summary['n_labels']} labels in {len(variants)} "
             f"variant(s), {summary['size']}"]
    if variants:
        lines += ["", f"  {'variant':<18} {'labels':>6} {'held-out':>8} {'atoms/frame':>15} "
                      f"{'forces':>6} {'stress':>6} {'periodic':>8}  references"]
    for name, v in variants.items():
        size = v["atoms_per_frame"]
        sizes = f"{size['min']}-{size['median']:g}-{size['max']}"
        refs = ", ".join(f"{k} ({n})" for k, n in v["references"].items())
        lines.append(f"  {name:<18} {v['n_labels']:>6} {v['n_holdout']:>8} {sizes:>15} "
                     f"{v['with_forces']:>6} {v['with_stress']:>6} {v['periodic']:>8}  {refs}")
    lines += ["", "  atoms/frame: min-median-max",
              f"elements: {' '.join(summary['elements']) or '-'}"
              f"   (allowed: {' '.join(summary['allowed_elements'] or []) or 'any'}; "
              f"forces required: {'yes' if summary['require_forces'] else 'no'})"]
    stamps = [(v["first_appended"], v["last_appended"]) for v in variants.values()
              if v["first_appended"]]
    if stamps:
        lines.append(f"appended: {min(s[0] for s in stamps)} ... {max(s[1] for s in stamps)}")
    fail = summary["failures"]
    text = f"failures: {fail['n_failures']}"
    if fail["n_failures"]:
        kinds = ", ".join(f"{k} ({n})" for k, n in fail["error_types"].items())
        text += f" [{kinds}]; last: {fail['last_error']}"
    lines.append(text)
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    path = existing_file(args.file, "label buffer")
    summary = buffer_summary(path)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return EXIT_OK


# ---------------------------------------------------------------------- export
def run_export(args: argparse.Namespace) -> int:
    from ..buffer import LabelBuffer
    from ..variants import validate_variant

    path = existing_file(args.file, "label buffer")
    variant = None if args.variant is None else validate_variant(args.variant)
    output = _writable_output(args.output)
    if output.is_dir():
        raise UsageError(f"output {args.output!r} is a directory; give a file name")
    with LabelBuffer(path, mode="r") as buffer:
        if variant is not None and variant not in buffer.variants:
            raise UsageError(f"{args.file!r} has no labels of {variant!r}; it has "
                             f"{list(buffer.variants)}")
        n = buffer.to_extxyz(output, variant=variant)
        variant = variant or (buffer.variants[0] if buffer.variants else None)
    print(f"wrote {n} labels of {variant!r} to {output} (metatrain keys: energy, forces, "
          "stress)")
    return EXIT_OK


# ---------------------------------------------------------------------- import
def _settings_of(path: pathlib.Path, allow_missing_forces: bool) -> Dict[str, Any]:
    """Settings new labels must satisfy: the existing buffer's, or those to create it with."""
    from ..buffer import LabelBuffer

    if path.exists():
        with LabelBuffer(path, mode="r") as buffer:
            return {"allowed_elements": buffer.allowed_elements,
                    "require_forces": buffer.require_forces}
    return {"allowed_elements": None, "require_forces": not allow_missing_forces}


def _import_all(target, inputs: List[pathlib.Path], args: argparse.Namespace) -> List[int]:
    keys = dict(energy_key=args.energy_key, forces_key=args.forces_key,
                stress_key=args.stress_key)
    return [len(target.import_file(path, variant=args.variant, index=args.index,
                                   skip_duplicates=not args.keep_duplicates, **keys))
            for path in inputs]


def run_import(args: argparse.Namespace) -> int:
    from ..buffer import LabelBuffer
    from ..variants import validate_variant

    validate_variant(args.variant)
    inputs = [existing_file(name, "input file") for name in args.inputs]
    output = pathlib.Path(args.output)
    if any(p.resolve() == output.resolve() for p in inputs):
        raise UsageError("an input is the output buffer itself")
    settings = _settings_of(output, args.allow_missing_forces)
    with memory_buffer(**settings) as check:  # validate everything before writing
        _import_all(check, inputs, args)
    create = None if output.exists() else settings["require_forces"]
    with LabelBuffer(output, mode="a", require_forces=create) as buffer:
        counts = _import_all(buffer, inputs, args)
        total = len(buffer)
    for path, n in zip(inputs, counts):
        print(f"imported {n} labels of {args.variant!r} from {path}")
    print(f"{output}: {total} labels")
    return EXIT_OK



# ---------------------------------------------------------------------- recover
def run_recover(args: argparse.Namespace) -> int:
    from ..buffer import recover_buffer

    path = existing_file(args.file, "label buffer")
    output = _writable_output(args.output)
    if output.exists():
        raise UsageError(f"output {args.output!r} exists; recovery writes a new file")
    counts = recover_buffer(path, output)
    print(f"{output}: recovered {counts['labels']} labels ({counts['labels_lost']} lost) and "
          f"{counts['failures']} failure records ({counts['failures_lost']} lost) from {path}")
    return EXIT_OK


def _writable_output(name: str) -> pathlib.Path:
    """The output path, its folder created; bad input (exit 2) when that cannot be."""
    output = pathlib.Path(name)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write {name!r}: its folder cannot be created "
                         f"({type(exc).__name__}: {exc}); choose another path") from exc
    return output
