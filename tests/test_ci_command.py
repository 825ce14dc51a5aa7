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
"""CI runs exactly the test command README shows (the guide's rule), in a fresh venv without site-packages."""

import os
import re

from conftest import REPO


def test_ci_runs_readmes_test_command_in_a_fresh_venv():
    readme = open(os.path.join(REPO, "README.md")).read()
    commands = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    (test_command,) = [c.strip() for c in commands if "pytest" in c]
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert ci.strip().splitlines()[-1] == test_command
    assert "python -m venv" in ci and "system-site-packages" not in ci
    assert "unset PYTHONPATH" in ci
