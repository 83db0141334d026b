/*
 * How long one cache line takes to move between core 0 and core 1: two threads, one per
 * core, take turns incrementing a shared counter. blockd's null and malloc rows move a
 * few such lines per request between the target (core 0) and the client (core 1), so when
 * the host places the two vCPUs far apart (on this machine a transfer then takes 156-176 ns
 * instead of about 30) those rows measure the host's interconnect more than the targets:
 * blockd's null reads fall from ~6.5M to ~2.2M IOPS, QSD's from ~1.27M to ~0.89M.
 * bench/harness.py runs this before and after every measurement.
 *
 *   cc -O2 -pthread -o corelat bench/corelat.c && ./corelat [CPU_A CPU_B]
 *
 * Prints the median, over 5 batches, of the one-way transfer time in nanoseconds.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define TRANSFERS 100000L
#define BATCHES 5

static _Atomic long turn __attribute__((aligned(64)));

static void pin(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0) {
		fprintf(stderr, "corelat: cannot run on CPU %d\n", cpu);
		exit(1);
	}
}

/* For every other value in [from, to): waits for the counter to reach it, then hands the
 * counter on (the other thread takes the values in between). */
static void take_turns(long from, long to)
{
	for (long i = from; i < to; i += 2) {
		while (atomic_load_explicit(&turn, memory_order_acquire) != i)
			;
		atomic_store_explicit(&turn, i + 1, memory_order_release);
	}
}

static void *other(void *arg)
{
	pin(*(int *)arg);
	take_turns(1, TRANSFERS * BATCHES);
	return NULL;
}

static double now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	int a = argc > 2 ? atoi(argv[1]) : 0, b = argc > 2 ? atoi(argv[2]) : 1;
	double ns[BATCHES];
	pthread_t t;
	pin(a);
	if (pthread_create(&t, NULL, other, &b) != 0)
		return 1;
	for (int k = 0; k < BATCHES; k++) {
		double t0 = now_ns();
		take_turns(k * TRANSFERS, (k + 1) * TRANSFERS);
		ns[k] = (now_ns() - t0) / TRANSFERS;
	}
	pthread_join(t, NULL);
	qsort(ns, BATCHES, sizeof ns[0], cmp);
	printf("%.1f\n", ns[BATCHES / 2]);
	return 0;
}
