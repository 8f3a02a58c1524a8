"""The finished pairs of an evaluation in progress, kept on disk so that ``--resume`` continues it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from textscf.errors import InputError, OutputError
from textscf.io import write_bytes_atomically

#: Where finished pairs are kept until the whole evaluation is done (see :mod:`textscf.evaluate`).
PARTIAL_FOLDER = "partial"

PARTIAL_ROWS = "pairs.jsonl"


class PartialResults:
    """The finished pairs of an evaluation in progress: ``pairs.jsonl`` (a settings line, then one line per pair,
    appended and flushed to disk as each pair finishes) and the pairs' Learn2Reg fields, in one folder."""

    def __init__(self, folder: Path, signature: dict):
        self.folder = folder
        self.rows_path = folder / PARTIAL_ROWS
        self.signature = json.loads(json.dumps(signature, default=str))

    def _read(self) -> tuple[dict | None, dict[str, dict]]:
        header, done = None, {}
        with self.rows_path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by a kill: that pair runs again
                    continue
                if "settings" in entry:
                    header = entry["settings"]
                elif "pair" in entry:
                    done[entry["pair"]] = entry
        return header, done

    def open(self, resume: bool, overwrite: bool) -> dict[str, dict]:
        """The finished pairs to keep ({} for a new evaluation); starts ``pairs.jsonl``."""
        done: dict[str, dict] = {}
        if self.rows_path.is_file():
            header, previous = self._read()
            if resume:
                if header != self.signature:
                    changed = sorted(k for k in set(self.signature) | set(header or {})
                                     if (header or {}).get(k) != self.signature.get(k))
                    raise InputError(
                        f"the unfinished evaluation in '{self.folder}' ran with other settings ({', '.join(changed)} "
                        "differ), so its pairs cannot be mixed with new ones. Fix: resume with the same options, or "
                        "pass --overwrite instead of --resume to start over.")
                done = previous
            elif overwrite:
                self.remove()
            else:
                raise OutputError(
                    f"'{self.folder}' holds an unfinished evaluation ({len(previous)} finished pair(s)). Fix: pass "
                    "--resume to continue it (only the missing pairs are registered), or --overwrite to start over.")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not done:
                self._append({"settings": self.signature}, mode="w")
        except OSError as exc:
            raise OutputError(f"cannot write the evaluation's progress file '{self.rows_path}' "
                              f"({exc.strerror or exc}). Fix: choose an output folder you can write to.") from None
        return done

    def _append(self, entry: dict, mode: str = "a") -> None:
        with self.rows_path.open(mode, encoding="utf-8") as f:
            f.write(json.dumps(entry, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add(self, name: str, pair_row: dict, region_rows: list[dict], npz_name: str | None,
            npz: bytes | None) -> dict:
        """Keep one finished pair (its field first, then its line: a listed pair is complete)."""
        if npz is not None:
            write_bytes_atomically(npz, self.folder / npz_name, "the Learn2Reg field")
        entry = {"pair": name, "per_pair": pair_row, "per_region": region_rows, "npz": npz_name}
        self._append(entry)
        return json.loads(json.dumps(entry, default=_json_default))

    def npz_bytes(self, name: str) -> bytes:
        try:
            return (self.folder / name).read_bytes()
        except OSError as exc:
            raise OutputError(f"the kept Learn2Reg field '{self.folder / name}' cannot be read "
                              f"({exc.strerror or exc}). Fix: run again with --overwrite.") from None

    def remove(self) -> None:
        """Remove the files this class writes, then the folder if that leaves it empty."""
        if self.rows_path.is_file():
            try:
                _, done = self._read()
            except OSError:
                done = {}
            for entry in done.values():
                if entry.get("npz") and Path(entry["npz"]).name == entry["npz"]:
                    (self.folder / entry["npz"]).unlink(missing_ok=True)
            self.rows_path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass

def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
