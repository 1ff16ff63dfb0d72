"""The ``retrieval-jax`` subcommands, one small module each (``retrieval_jax.cli`` dispatches).

Each module exposes ``main(argv) -> int`` (0 on success, 2 on a usage or input error, which is
reported as one line ``retrieval-jax <command>: error: ...`` on stderr) and runs on its own with
``python -m retrieval_jax.commands.<name>``:

- :mod:`.extract`: images (folders, files, text lists) -> ``descriptors.npy`` + ``paths.json``.
- :mod:`.index`: an ``extract`` directory -> a saved exact or ScaNN index.
- :mod:`.search`: query images -> top-k paths (printed, ``--json``, ``--grid`` PNG).
- :mod:`.evaluate`: a retriever on a benchmark -> the score table and ``report.json``.
- :mod:`.datasets`: the dataset builders and how to obtain each.
- :mod:`.convert`: torchvision / Keras / efficientnet-pytorch weights -> a saved Retriever.

:mod:`._common` holds what they share (retriever flags, image lists, dataset names, errors).
"""
