"""The DRAM-bytes benchmark's parts that need no GPU: reading ncu's CSV and the ncu command."""


import pytest

BENCHMARK = "bench_lora_dram"  # the `bench` fixture of conftest.py

NCU_OUTPUT = """==PROF== Connected to process 4242 (/usr/bin/python3.12)
==PROF== Profiling "gemm" - 0: 0%....50%....100% - 1 pass
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3.12","127.0.0.1","gemm","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","67,108,864"
"0","4242","python3.12","127.0.0.1","gemm","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","Mbyte","33.5"
"1","4242","python3.12","127.0.0.1","xa","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","Kbyte","2.5"
"1","4242","python3.12","127.0.0.1","xa","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","sm__cycles_elapsed.avg","cycle","1,000"
==PROF== Disconnected from process 4242
"""


def test_dram_bytes_sum_read_and_write_over_kernels_in_bytes(bench):
    assert bench.dram_bytes(NCU_OUTPUT) == (67_108_864 + 33_500_000 + 2_500, 2)


@pytest.mark.parametrize("output, message", [
    ("==PROF== No kernels were profiled.\n", "no ncu CSV table"),
    (NCU_OUTPUT.replace('"byte","67', '"furlong","67'), "unexpected unit 'furlong'"),
    (NCU_OUTPUT.replace("dram__bytes", "lts__bytes"), "reported none of"),
])
def test_unreadable_ncu_output_is_an_error_naming_the_problem(bench, output, message):
    with pytest.raises(ValueError, match=message):
        bench.dram_bytes(output)


def test_ncu_profiles_only_the_childs_marked_step(bench):
    command = bench.ncu_command("/opt/ncu", "lowrank_auto", bench.HEADLINE_SHAPE, "bf16")
    assert command[:3] == ["/opt/ncu", "--profile-from-start", "off"]
    assert command[command.index("--metrics") + 1] == "dram__bytes_read.sum,dram__bytes_write.sum"
    assert command[-6:] == ["--profile-one", "lowrank_auto", "--shape", "8192,4096,4096,16", "--dtype", "bf16"]
