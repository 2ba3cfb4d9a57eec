/*
 * memhog: the guest-side data tool of the zramd VM test (built static by scripts/vm/build.py).
 *
 * Theory of operation
 * -------------------
 * Two jobs, both deterministic from a seed so that nothing has to be stored to check it later:
 *
 *   memhog hog MIB SEED [sync [TAG]]
 *       Allocate MIB MiB in page-aligned chunks (mmap), fill every 4 KiB page with a pattern derived from
 *       (page index, seed), then read every page back and compare with the regenerated pattern.
 *       With "sync", print "@@SYNC TAG" (default swap-mid) after the write pass and wait for one line on stdin
 *       (the host reads the server's stats at that point, while the pages sit in swap).
 *       The page mix is chosen to exercise a zram-style server: 1/8 zero pages, 1/8 same-filled
 *       pages (one repeated 8-byte word), 1/2 compressible pages, 1/4 incompressible pages.
 *       Exit 0 only if every page matches; exit 2 on any mismatch (first ones are printed).
 *
 *   memhog gen KIND SEED BYTES
 *       Write BYTES bytes of KIND (random | text) to stdout: a fast, entropy-free stand-in for
 *       /dev/urandom (random) and for ordinary text (text), used to make test files.
 *
 * Invariant: the pattern of a page depends only on (index, seed); a page whose header or body
 * differs from the regenerated one is corruption, never "expected". No dynamic libraries.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

enum { PAGE = 4096, WORDS = PAGE / 8, CHUNK_MIB = 16, MAX_REPORTED = 8, GEN_BUF = 1 << 16 };

static uint64_t mix(uint64_t x) { /* splitmix64 finaliser */
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* kind of page i: 0 zero, 1 same-filled, 2..5 compressible, 6..7 random */
static unsigned page_kind(uint64_t i, uint64_t seed) { return (unsigned)(mix(i ^ (seed << 20)) & 7); }

static void fill_page(uint64_t *w, uint64_t i, uint64_t seed) {
	uint64_t h = mix(i * 0x100000001b3ULL + seed);
	unsigned kind = page_kind(i, seed);
	if (kind == 0) {
		memset(w, 0, PAGE);
		return;
	}
	if (kind == 1) {
		uint64_t v = h | 1; /* never zero: zero pages are kind 0 */
		for (int j = 0; j < WORDS; j++) w[j] = v;
		return;
	}
	w[0] = i ^ 0x5a5a5a5a00000000ULL;
	w[1] = seed;
	if (kind <= 5) {
		/* compressible: runs of 16 equal words, different per run and per page */
		for (int j = 2; j < WORDS; j++) w[j] = h + (uint64_t)(j / 16);
	} else {
		uint64_t s = h;
		for (int j = 2; j < WORDS; j++) w[j] = s = mix(s);
	}
}

static int hog(long mib, uint64_t seed, const char *sync_tag) {
	long chunks = (mib + CHUNK_MIB - 1) / CHUNK_MIB;
	long pages_per_chunk = (long)CHUNK_MIB * 1024 * 1024 / PAGE;
	uint64_t **mem = calloc((size_t)chunks, sizeof(*mem));
	uint64_t ref[WORDS];
	long mismatches = 0, pages = chunks * pages_per_chunk, kinds[8] = {0};
	double t0 = now();
	if (!mem) return 3;
	for (long c = 0; c < chunks; c++) {
		/* mmap, not malloc: malloc's 16-byte chunk header would make every "page" of the
		 * pattern straddle two real pages, and no real page would be same-filled */
		void *p = mmap(NULL, (size_t)pages_per_chunk * PAGE, PROT_READ | PROT_WRITE,
		               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		mem[c] = p == MAP_FAILED ? NULL : p;
		if (!mem[c]) {
			printf("memhog: mmap failed at chunk %ld\n", c);
			return 3;
		}
		for (long p = 0; p < pages_per_chunk; p++) {
			uint64_t idx = (uint64_t)(c * pages_per_chunk + p);
			fill_page(mem[c] + p * WORDS, idx, seed);
			kinds[page_kind(idx, seed)]++;
		}
	}
	double t1 = now();
	printf("memhog: wrote %ld MiB (%ld pages) in %.1fs: zero=%ld same=%ld compressible=%ld "
	       "random=%ld\n", chunks * CHUNK_MIB, pages, t1 - t0, kinds[0], kinds[1],
	       kinds[2] + kinds[3] + kinds[4] + kinds[5], kinds[6] + kinds[7]);
	fflush(stdout);
	if (sync_tag) {
		char line[64];
		printf("@@SYNC %s\n", sync_tag);
		fflush(stdout);
		if (!fgets(line, sizeof line, stdin)) printf("memhog: no sync reply\n");
	}
	double t2 = now();
	for (long c = 0; c < chunks; c++) {
		for (long p = 0; p < pages_per_chunk; p++) {
			uint64_t idx = (uint64_t)(c * pages_per_chunk + p);
			fill_page(ref, idx, seed);
			if (memcmp(ref, mem[c] + p * WORDS, PAGE) != 0) {
				if (mismatches < MAX_REPORTED)
					printf("memhog: MISMATCH page %llu kind %u\n", (unsigned long long)idx,
					       page_kind(idx, seed));
				mismatches++;
			}
		}
	}
	double t3 = now();
	printf("memhog: verified %ld pages in %.1fs, mismatches=%ld\n", pages, t3 - t2, mismatches);
	fflush(stdout);
	return mismatches ? 2 : 0;
}

static int gen(const char *kind, uint64_t seed, long long bytes) {
	static const char *words[] = {"zram", "block", "page", "swap", "kernel", "network", "device",
	                              "the", "of", "and", "compressed", "memory", "server", "a",
	                              "export", "request", "reply", "data", "\n", "to"};
	static unsigned char buf[GEN_BUF];
	uint64_t s = mix(seed);
	int text = strcmp(kind, "text") == 0;
	if (!text && strcmp(kind, "random") != 0) return 1;
	while (bytes > 0) {
		size_t n = 0;
		if (text) {
			while (n < sizeof buf - 16) {
				const char *w = words[(s = mix(s)) % (sizeof words / sizeof *words)];
				size_t l = strlen(w);
				memcpy(buf + n, w, l);
				n += l;
				buf[n++] = ' ';
			}
		} else {
			for (; n < sizeof buf; n += 8) {
				s = mix(s);
				memcpy(buf + n, &s, 8);
			}
		}
		if ((long long)n > bytes) n = (size_t)bytes;
		if (fwrite(buf, 1, n, stdout) != n) return 1;
		bytes -= (long long)n;
	}
	return fflush(stdout) ? 1 : 0;
}

int main(int argc, char **argv) {
	if (argc >= 4 && strcmp(argv[1], "hog") == 0)
		return hog(atol(argv[2]), strtoull(argv[3], NULL, 0),
		           argc > 4 && !strcmp(argv[4], "sync") ? (argc > 5 ? argv[5] : "swap-mid") : NULL);
	if (argc == 5 && strcmp(argv[1], "gen") == 0)
		return gen(argv[2], strtoull(argv[3], NULL, 0), atoll(argv[4]));
	fprintf(stderr, "usage: memhog hog MIB SEED [sync [TAG]] | memhog gen random|text SEED BYTES\n");
	return 1;
}
