"""HTTP clients' shared machinery: retries with backoff, endpoint pools, images on the wire.

Below both `reasonedit.inference` (the HTTP editor and thinker) and `reasonedit.eval` (the judge); imports
nothing of ours but `reasonedit.errors`.
"""
