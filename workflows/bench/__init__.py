"""`kd bench ...`: benchmarks that time (or size) both sides of a comparison in one run and print a
ratio. Each shows kd-ops' progress lines on the terminal, keeps Ray's output in its log file
(`<out>/logs/kd.log`) and, with --json, prints one JSON object as the last line of stdout."""
