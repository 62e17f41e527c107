"""Training data: the dataset format and its reader (``dataset``), the readers of the collections dataset_tool.py
converts (``sources``) and the conversion itself (``convert``), and the non-leaking augmentation (``augment``).

Configs and snapshots name the dataset and augmentation classes by their official paths,
``training.dataset.ImageFolderDataset`` and ``training.augment.AugmentPipe``; ``dnnlib.util.get_obj_by_name`` finds
them here (``training/__init__.py`` declares the moves).
"""
