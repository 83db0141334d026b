/*
 * The malloc bdev's floor on this machine: how long one 4 KiB memcpy takes from a random
 * 4 KiB block of a written, transparent-huge-page-backed region, against a region that
 * fits in the CPU caches. A malloc read is that copy plus blockd's ring path, so this
 * bounds what bench/run.sh's malloc rows can reach.
 *
 *   cc -O2 -o /tmp/memcopy bench/memcopy.c && taskset -c 0 /tmp/memcopy [MIB...]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

static void probe(size_t mib)
{
	size_t size = mib << 20, blocks = size / 4096;
	char *m = mmap(NULL, size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	static char buf[32 * 4096] __attribute__((aligned(4096)));
	unsigned long long seed = 1, n = 0;
	double t0;

	if (m == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	madvise(m, size, MADV_HUGEPAGE); /* as the malloc bdev does */
	memset(m, 1, size);              /* written: no shared zero page */
	t0 = now();
	while (now() - t0 < 2) {
		for (int i = 0; i < 32 * 256; i++, n++) {
			seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
			memcpy(buf + (i % 32) * 4096, m + ((seed >> 20) % blocks) * 4096, 4096);
		}
	}
	printf("%6zu MiB: %4.0f ns per 4 KiB copy\n", mib, (now() - t0) * 1e9 / n);
	munmap(m, size);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		probe(16);
		probe(1024);
	}
	for (int i = 1; i < argc; i++)
		probe(strtoull(argv[i], NULL, 10));
	return 0;
}
