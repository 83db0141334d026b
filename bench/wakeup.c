/*
 * What it costs to wake a thread that sleeps on an eventfd on the other vCPU: the price of
 * every interrupt blockd sends a client (or a guest vCPU) that waits for completions.
 * Thread A on core 0 busy-loops 100 us (so B's vCPU goes idle), then writes the eventfd and
 * spins until B says it ran; thread B on core 1 waits in poll(2), reads the eventfd, then
 * busy-works 10 us incrementing a shared counter. Prints the mean time A spent in write(2),
 * the mean time from A's write to B's end, and how many distinct counter values A saw while
 * B worked (many: the two vCPUs really run at once; one: the host time-shares them).
 *
 *   cc -O2 -pthread -o wakeup bench/wakeup.c && ./wakeup [ROUNDS]
 */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

static int efd;
static long counter;
static int done_flag;

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void pin(int cpu)
{
	cpu_set_t s;
	CPU_ZERO(&s);
	CPU_SET(cpu, &s);
	pthread_setaffinity_np(pthread_self(), sizeof s, &s);
}

static void *sleeper(void *arg)
{
	(void)arg;
	pin(1);
	for (;;) {
		struct pollfd p = { .fd = efd, .events = POLLIN };
		uint64_t v;
		if (poll(&p, 1, -1) != 1 || read(efd, &v, sizeof v) != sizeof v)
			continue;
		uint64_t t = now_ns();
		long i = 0;
		while (now_ns() - t < 10000)
			__atomic_store_n(&counter, ++i, __ATOMIC_RELEASE);
		__atomic_store_n(&done_flag, 1, __ATOMIC_RELEASE);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 1000;
	pthread_t t;
	efd = eventfd(0, 0);
	if (efd < 0 || rounds <= 0 || pthread_create(&t, NULL, sleeper, NULL) != 0)
		return 1;
	pin(0);
	usleep(100000);
	double write_ns = 0, total_ns = 0, seen = 0;
	for (int r = 0; r < rounds; r++) {
		__atomic_store_n(&done_flag, 0, __ATOMIC_RELEASE);
		__atomic_store_n(&counter, 0, __ATOMIC_RELEASE);
		uint64_t s = now_ns();
		while (now_ns() - s < 100000)
			;
		uint64_t one = 1, t0 = now_ns();
		if (write(efd, &one, sizeof one) != sizeof one)
			return 1;
		write_ns += (double)(now_ns() - t0);
		long last = 0, changes = 0;
		while (!__atomic_load_n(&done_flag, __ATOMIC_ACQUIRE)) {
			long c = __atomic_load_n(&counter, __ATOMIC_ACQUIRE);
			if (c != last) {
				changes++;
				last = c;
			}
		}
		total_ns += (double)(now_ns() - t0);
		seen += (double)changes;
	}
	printf("write %.1f us, write to end of B's 10 us work %.1f us, counter values seen %.0f\n",
	       write_ns / rounds / 1000, total_ns / rounds / 1000, seen / rounds);
	return 0;
}
