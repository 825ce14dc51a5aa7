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
"""Faults one process of a multi-process test run injects into itself (conftest.run_processes(rank_setup=...))."""

import os
import time

from diffusers import UNet2DConditionModel


SLOW_RANK_DELAY_S = 60


def slow_model_loading_on_rank_1():
    """Rank 1 takes a minute to load its UNet, as a process on a slow disk would, while rank 0 waits in the next
    collective."""
    if os.environ["RANK"] != "1":
        return
    original = UNet2DConditionModel.from_pretrained.__func__

    def slow_from_pretrained(cls, *args, **kwargs):
        time.sleep(SLOW_RANK_DELAY_S)
        return original(cls, *args, **kwargs)

    UNet2DConditionModel.from_pretrained = classmethod(slow_from_pretrained)
