"""The toy worlds the offline pipeline trains and evaluates on: data generators, never imported by the core.

- ``shapes``: a synthetic shapes world (several shapes per image) with captions, multi-turn VQA, preference pairs and
  POPE questions; its scenes and captions are in ``scenes``, and ``records`` writes any source in the on-disk formats.
- ``easyvqa``: the ``easy-vqa`` package's single-shape images and questions, with a fixed validation split.
"""
