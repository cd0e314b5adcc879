#!/usr/bin/env bash
# On one GPU (~3 minutes): Nsight Compute's view of the decode-attention split kernel, float8 and bf16 caches:
# speed of light, occupancy, warp stall reasons, scheduler issue rate, memory and compute workload, as text under
# $OUT (ncu_<kv>.txt). Tells what bounds the kernel's per-SM rate (scripts/device/green_decode.py measures that rate).
source scripts/device/setup.sh
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: ${NCU:-none}"
if [ -z "$NCU" ]; then exit 3; fi
for kv in fp8 bf16; do
  timeout "${NCU_S:-120}" "$NCU" --kernel-name regex:_decode_split_kernel --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section InstructionStats \
    python3 scripts/device/profile_decode.py "$kv" > "$OUT/ncu_$kv.txt" 2>&1
  echo "ncu $kv rc $?"
  grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Theoretical Occupancy|Block Limit|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Shared Memory Configuration|Dynamic Shared|Static Shared|Executed Ipc|ERR" "$OUT/ncu_$kv.txt" | head -40
done
