"""Eval's output-path checks, which now live in `reasonedit.paths` (data synth, data import and train use them
too); this module keeps the old import path working."""

from reasonedit.paths import (MAX_NAME_BYTES, OutsidePathError, UnsafeNameError, inside, name_problem, output_file,
                              relative_name_problem, relative_source, safe_name)

__all__ = ["MAX_NAME_BYTES", "OutsidePathError", "UnsafeNameError", "inside", "name_problem", "output_file",
           "relative_name_problem", "relative_source", "safe_name"]
