"""Image datasets in the layout EDM users already have: a zip or folder of PNGs, as written by EDM's
dataset_tool.py, with optional class labels in dataset.json ({"labels": [[filename, label], ...]})."""

import json
import numbers
import os
import warnings
import zipfile

import numpy as np
import PIL.Image
import torch

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')

#----------------------------------------------------------------------------

# PIL.Image.open reads the header only. An image claiming more than PIL's MAX_IMAGE_PIXELS (89 M) is refused
# before it is decoded (PIL only warns up to twice that), in one line naming it.
def open_image(f, name):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', PIL.Image.DecompressionBombWarning)
            return PIL.Image.open(f)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
        raise ValueError(f'{name}: its header claims more than {PIL.Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?); replace or remove that image') from None

# A class label is a whole number >= 0 (JSON's 1.0 counts; True, -1, 1.5 and "1" do not).
def is_class_index(label):
    return isinstance(label, numbers.Real) and not isinstance(label, bool) and label >= 0 and float(label).is_integer()

#----------------------------------------------------------------------------

class ImageDataset:
    def __init__(self, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f'Dataset not found: {path} (pass a zip or folder of PNGs made by EDM\'s dataset_tool.py)')
        self.path = path
        self._zip, self._zip_pid = None, None
        if os.path.isdir(path):
            names = [os.path.relpath(os.path.join(root, f), path).replace('\\', '/') for root, _, files in os.walk(path) for f in files]
        elif zipfile.is_zipfile(path):
            names = self._open_zip().namelist()
        else:
            raise ValueError(f'Dataset {path} is neither a folder nor a zip file')
        self.files = sorted(f for f in names if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise ValueError(f'Dataset {path} contains no images ({", ".join(IMAGE_EXTENSIONS)})')
        self.labels = self._load_labels(names)
        image = self.image(0)
        self.resolution, self.channels = image.shape[0], image.shape[2]
        if image.shape[0] != image.shape[1]:
            raise ValueError(f'Dataset {path}: images must be square, {self.files[0]} is {image.shape[1]}x{image.shape[0]}')
        self.label_dim = 0 if self.labels is None else int(self.labels.max()) + 1

    def __len__(self):
        return len(self.files)

    # One handle per process: DataLoader workers are forked, and a shared zip handle would interleave their reads.
    def _open_zip(self):
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def _open(self, name):
        if os.path.isdir(self.path):
            return open(os.path.join(self.path, name), 'rb')
        return self._open_zip().open(name, 'r')

    def _load_labels(self, names):
        if 'dataset.json' not in names:
            return None
        try:
            with self._open('dataset.json') as f:
                labels = json.load(f).get('labels')
            labels = None if labels is None else dict(labels)
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f'Dataset {self.path}: dataset.json is not {{"labels": [[filename, label], ...]}} ({err})') from None
        if labels is None:
            return None
        missing = [f for f in self.files if f not in labels]
        if missing:
            raise ValueError(f'Dataset {self.path}: dataset.json has no label for {missing[0]} ({len(missing)} images unlabelled)')
        bad = next((f for f in self.files if not is_class_index(labels[f])), None)
        if bad is not None:
            raise ValueError(f'Dataset {self.path}: dataset.json labels {bad} with {labels[bad]!r}; labels are class indices 0, 1, 2, ...')
        return np.array([labels[f] for f in self.files], dtype=np.int64)

    # One image as uint8 HWC; a damaged file is named, and so is one whose header claims another size than the
    # first image's (read before decoding: a crafted header can claim gigapixels).
    def image(self, i):
        name = f'Dataset {self.path}: {self.files[i]}'
        try:
            with self._open(self.files[i]) as f:
                image = open_image(f, name)
                if hasattr(self, 'resolution') and image.size != (self.resolution, self.resolution):
                    raise ValueError(f'{name} claims {image.width}x{image.height} pixels, the dataset\'s images are {self.resolution}x{self.resolution}; replace or remove that image')
                image = np.array(image)
        except (OSError, SyntaxError, zipfile.BadZipFile) as err:
            raise ValueError(f'Dataset {self.path}: cannot read {self.files[i]} ({err}); replace or remove that image') from None
        return image[:, :, np.newaxis] if image.ndim == 2 else image

    # A batch as uint8 NCHW; all images must share the first image's shape.
    def images(self, indices):
        batch = np.stack([self.image(int(i)) for i in indices])
        if batch.shape[1:] != (self.resolution, self.resolution, self.channels):
            raise ValueError(f'Dataset {self.path}: images differ in shape from {self.files[0]}')
        return torch.from_numpy(batch).permute(0, 3, 1, 2)

    # The error of the first image among `indices` that cannot be read or differs in shape; None if all are fine.
    def first_damaged(self, indices):
        for i in indices:
            try:
                self.images([i])
            except ValueError as err:
                return str(err)
        return None

    # Class labels as one-hot float rows (EDM's convention); None for an unlabelled dataset.
    def one_hot(self, indices, label_dim=None):
        if self.labels is None:
            return None
        return torch.nn.functional.one_hot(torch.as_tensor(self.labels[np.asarray(indices)]), label_dim or self.label_dim).float()

#----------------------------------------------------------------------------
