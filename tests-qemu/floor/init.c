/* The benchmarks' floor: the smallest init the kernel can run. It prints the
 * guest uptime, then powers off (boot benchmark) or sleeps forever (idle
 * benchmark, built with -DFLOOR_IDLE). Built static for aarch64 by scripts/bench. */
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <sys/reboot.h>

int main(void) {
	struct timespec t;
	clock_gettime(CLOCK_BOOTTIME, &t);
	printf("FLOOR READY uptime %ld.%03ld\n", (long)t.tv_sec, t.tv_nsec / 1000000);
	fflush(stdout);
#ifndef FLOOR_IDLE
	sync();
	reboot(RB_POWER_OFF);
#endif
	/* FLOOR_IDLE: the idle benchmark's floor sleeps forever. */
	for (;;) pause();
}
