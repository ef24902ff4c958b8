"""Small utilities shared by the library, the evaluation code and the command-line scripts.

* :mod:`hessdiff.utils.images` -- the image tensor convention, :func:`~hessdiff.utils.images.load_image`
  and :func:`~hessdiff.utils.images.save_image`;
* :mod:`hessdiff.utils.files` -- atomic writes of one or several files;
* :mod:`hessdiff.utils.seeds` -- seed lists such as ``"0-15"`` or ``"0,3,7-9"``;
* :mod:`hessdiff.utils.suggest` -- "did you mean ...?" hints.

Import the sub-modules directly (``from hessdiff.utils.files import atomic_write``); this package
imports nothing itself.
"""
