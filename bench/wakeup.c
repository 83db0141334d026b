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
 *
 * `pingpong`: the floor of a QD1 round trip between a client and a target that polls and
 * does no work, what the host allows before any target code runs. A "target" thread on
 * TARGET_CPU busy-polls a shared flag (as a polling reactor watches the avail ring), clears
 * it and writes an eventfd (the completion interrupt); the "client" thread on CLIENT_CPU
 * sets the flag (the kick-free submission) and waits for the eventfd, then does it again.
 *
 *   ./wakeup pingpong [ROUNDS [TARGET_CPU CLIENT_CPU [sleep|poll|both [DELAY_NS]]]]
 *
 * DELAY_NS (default 0) makes the target spin that long between seeing the flag and
 * writing the eventfd, a target that works before it answers. On a VM whose wake-ups go
 * through the hypervisor an answer within about a microsecond catches the client's vCPU
 * on its way into idle and takes the slow path (bench/README.md, "The poll window, and
 * the host's floor"): compare DELAY_NS 0 with 1000.
 *
 * The sleeping client waits in poll(2) on the eventfd and reads it, as a client sleeping on
 * its completion fd does (`blockctl bench --no-poll`). The target may answer before poll
 * gets to sleep; the client then finds the eventfd readable and does not sleep: that is a
 * real case of such a client and part of the distribution ("slept" says in how many rounds
 * the client thread did sleep, from its voluntary context switches). The polling client
 * (`--poll`) spins on a nonblocking read of the eventfd instead. Each mode (default both)
 * runs ROUNDS round trips (default 20000; fewer when they take over 0.4 s) and prints their
 * p10/p50/p90/p99 (CLOCK_MONOTONIC, from setting the flag to having read the eventfd) in
 * us, then all modes in one JSON line for machines (bench/harness.py):
 *   {"sleep_us":{"p10":..,"p50":..,"p90":..,"p99":..},"sleep_rounds":N,"sleep_slept":..,
 *    "poll_us":{..},"poll_rounds":N,"target_cpu":0,"client_cpu":1}
 */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
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

static int wakeup_main(int argc, char **argv)
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

/* pingpong: the target's request flag (alone on its cache line) and its completion fd. */
static int pp_flag __attribute__((aligned(64)));
static int pp_efd;
static uint64_t pp_delay_ns;
/* Each mode stops early after this long, so that a probe stays cheap on a host whose
 * wake-ups take tens of us or whose tail takes milliseconds. */
#define PP_BUDGET_NS 400000000ull

static int pin_to(int cpu)
{
	cpu_set_t s;
	CPU_ZERO(&s);
	CPU_SET(cpu, &s);
	if (pthread_setaffinity_np(pthread_self(), sizeof s, &s) != 0) {
		fprintf(stderr, "wakeup: cannot run on CPU %d\n", cpu);
		return -1;
	}
	return 0;
}

static void *pp_target(void *arg)
{
	if (pin_to(*(int *)arg) != 0)
		exit(1);
	uint64_t one = 1;
	for (;;) {
		while (!__atomic_load_n(&pp_flag, __ATOMIC_ACQUIRE))
			;
		__atomic_store_n(&pp_flag, 0, __ATOMIC_RELAXED);
		for (uint64_t t = now_ns(); now_ns() - t < pp_delay_ns;)
			;
		if (write(pp_efd, &one, sizeof one) != sizeof one)
			exit(1);
	}
	return NULL;
}

/* One round trip in ns: set the flag, wait for the eventfd (poll(2), or spin on read). */
static uint64_t pp_round(int sleep)
{
	uint64_t v, t0 = now_ns();
	__atomic_store_n(&pp_flag, 1, __ATOMIC_RELEASE);
	for (;;) {
		if (sleep) {
			struct pollfd p = { .fd = pp_efd, .events = POLLIN };
			if (poll(&p, 1, -1) != 1)
				continue;
		}
		if (read(pp_efd, &v, sizeof v) == sizeof v)
			return now_ns() - t0;
	}
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

static long voluntary_switches(void)
{
	struct rusage u;
	return getrusage(RUSAGE_THREAD, &u) == 0 ? u.ru_nvcsw : 0;
}

/* Runs `rounds` round trips (after a few unrecorded ones; fewer if they take more than
 * PP_BUDGET_NS), prints the human line and appends the mode's JSON fields to `json`. */
static void pp_mode(int sleep, int max_rounds, uint64_t *lat, char *json, size_t cap)
{
	const char *name = sleep ? "sleep" : "poll";
	for (int i = 0; i < 200; i++)
		pp_round(sleep);
	long sw0 = voluntary_switches();
	uint64_t end = now_ns() + PP_BUDGET_NS;
	int rounds = 0;
	while (rounds < max_rounds && (rounds < 100 || now_ns() < end))
		lat[rounds++] = pp_round(sleep);
	double slept = (double)(voluntary_switches() - sw0) / rounds, mean = 0;
	for (int i = 0; i < rounds; i++)
		mean += (double)lat[i] / 1000 / rounds;
	qsort(lat, (size_t)rounds, sizeof *lat, cmp_u64);
	double p[4];
	const int pct[4] = { 10, 50, 90, 99 };
	for (int k = 0; k < 4; k++)
		p[k] = (double)lat[(size_t)rounds * (size_t)pct[k] / 100] / 1000;
	printf("%s client round trip us (%d rounds): mean %.2f p10 %.2f p50 %.2f p90 %.2f "
	       "p99 %.2f", name, rounds, mean, p[0], p[1], p[2], p[3]);
	if (sleep)
		printf(", slept in %.0f%% of rounds", 100 * slept);
	printf("\n");
	size_t n = strlen(json);
	n += (size_t)snprintf(json + n, cap - n,
			      "\"%s_us\":{\"mean\":%.3f,\"p10\":%.3f,\"p50\":%.3f,\"p90\":%.3f,"
			      "\"p99\":%.3f},\"%s_rounds\":%d,",
			      name, mean, p[0], p[1], p[2], p[3], name, rounds);
	if (sleep)
		snprintf(json + n, cap - n, "\"sleep_slept\":%.4f,", slept);
}

static int pingpong_main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 20000;
	int target_cpu = argc > 3 ? atoi(argv[2]) : 0, client_cpu = argc > 3 ? atoi(argv[3]) : 1;
	const char *which = argc > 4 ? argv[4] : "both";
	pp_delay_ns = argc > 5 ? strtoull(argv[5], NULL, 10) : 0;
	int do_sleep = !strcmp(which, "sleep") || !strcmp(which, "both");
	int do_poll = !strcmp(which, "poll") || !strcmp(which, "both");
	uint64_t *lat = malloc(sizeof *lat * (size_t)(rounds > 0 ? rounds : 1));
	pthread_t t;
	if (rounds <= 0 || (!do_sleep && !do_poll) || !lat) {
		fprintf(stderr, "usage: wakeup pingpong [ROUNDS [TARGET_CPU CLIENT_CPU "
				"[sleep|poll|both [DELAY_NS]]]]\n");
		return 2;
	}
	pp_efd = eventfd(0, EFD_NONBLOCK);
	if (pp_efd < 0 || pin_to(client_cpu) != 0 ||
	    pthread_create(&t, NULL, pp_target, &target_cpu) != 0)
		return 1;
	char json[512] = "{";
	if (do_sleep)
		pp_mode(1, rounds, lat, json, sizeof json);
	if (do_poll)
		pp_mode(0, rounds, lat, json, sizeof json);
	printf("%s\"target_cpu\":%d,\"client_cpu\":%d,\"delay_ns\":%llu}\n", json, target_cpu,
	       client_cpu, (unsigned long long)pp_delay_ns);
	/* The target thread spins forever: exit ends it. */
	exit(0);
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "pingpong"))
		return pingpong_main(argc - 1, argv + 1);
	return wakeup_main(argc, argv);
}
