# Copyright 2026 The InPO for diffusers authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Pick-a-Pic v2's layout, as the training scripts read it: one parquet file of caption, two encoded images, label_0.

    encode_png               uint8 (H, W, 3) array -> PNG bytes (a `jpg_0` / `jpg_1` cell)
    write_pickapic_parquet   rows (caption, jpg_0, jpg_1, label_0) -> `<folder>/<split>-00000-of-00001.parquet`

The alignment benchmark's preference pairs and the tests' tiny datasets are written through these.
"""

import io
import os

from PIL import Image


def encode_png(array):
    """PNG bytes of a uint8 (H, W, 3) image array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pickapic_schema():
    """The four columns the training scripts read; Pick-a-Pic v2 has more, which they ignore."""
    import pyarrow as pa

    return pa.schema(
        [("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64())]
    )


def write_pickapic_parquet(folder, rows, split="train"):
    """Write `rows` (dicts with caption, jpg_0, jpg_1, label_0) to `<folder>/<split>-00000-of-00001.parquet`, the
    file name `datasets` maps to that split; return `folder`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(rows), schema=pickapic_schema())
    os.makedirs(folder, exist_ok=True)
    pq.write_table(table, os.path.join(folder, f"{split}-00000-of-00001.parquet"))
    return folder
