bash bench/run_device.sh ab-serve; date
