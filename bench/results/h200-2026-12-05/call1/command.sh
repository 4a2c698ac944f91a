date; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; bash bench/run_device.sh ab-check; date
