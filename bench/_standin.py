"""`blendserve run` with a stand-in engine that answers every request at once with one token: what a
benchmark runs where only the run's own work (reading, resume, planning, writing) is measured.
Used as `python bench/_standin.py run ...` with PYTHONPATH naming the code version to measure."""

from __future__ import annotations

import asyncio
import sys


class StandIn:
    def __init__(self, cfg=None):
        self.loop = asyncio.new_event_loop()

    async def async_generate(self, input_ids=None, sampling_params=None, **kw):
        return {"text": "x", "output_ids": [1], "meta_info": {"id": "s", "prompt_tokens": len(input_ids),
                                                               "completion_tokens": 1, "cached_tokens": 0,
                                                               "finish_reason": {"type": "length"}}}

    def get_server_info(self):
        return {"max_total_num_tokens": 32768, "max_running_requests": 64}

    def shutdown(self):
        self.loop.close()


if __name__ == "__main__":
    from blendserve_sgl import cli
    from blendserve_sgl.batch import runner

    runner.start_engine = StandIn
    runner.prepare_environment = lambda device="auto": "cpu"
    sys.argv[0] = "blendserve"
    raise SystemExit(cli.main(sys.argv[1:]))
