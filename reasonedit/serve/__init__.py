"""The edit service: our generator (and the think -> edit -> reflect loop) behind EditThinker's editing API.

`create_app(editor, ServeConfig(...), thinker)` builds the FastAPI app; `ServerThread` runs it on
uvicorn in a thread; `reasonedit serve --model DIR` runs it as a command. See docs/serve.md.
"""

import importlib

# names load on first use, so `reasonedit --help` (which imports serve.cli) stays fast
_EXPORTS = {"ServeConfig": "app", "create_app": "app", "EditBatcher": "batcher", "QueueFull": "batcher",
            "ServerThread": "runner", "Limits": "schema", "RequestError": "schema", "parse_edit": "schema"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"reasonedit.serve.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'reasonedit.serve' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
