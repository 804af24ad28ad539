"""The I/O layer: files read from untrusted places and written at disk speed, below everything else.

- :mod:`.files`: an input path checked to be a regular file (not a folder, a pipe or a device).
- :mod:`.jsonio`: the one strict JSON reader (a key twice, ``NaN``, a number beyond a float, an
  integer too long, nesting too deep: all refused) and the one JSON writer of every file we write.
- :mod:`.safetensors`: safetensors headers read and checked without loading data; files written
  tensor by tensor (:class:`~.safetensors.SafetensorsWriter`), each tensor a
  :class:`~.safetensors.TensorSpec`.
- :mod:`.direct_io`: append-only writes past the page cache (``O_DIRECT``) where allowed.
- :mod:`.streaming`: tensors in flight with bounded memory: reusable buffers, mapped regions,
  positional reads, and a look-ahead over a thread pool (the merge's engine).

Nothing here imports anything of the package above :mod:`mlora_export.errors` and
:mod:`mlora_export.validate`; importing this package imports none of its modules.
"""
