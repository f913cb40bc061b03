/*
 * kvfs-loader from C: open a chunk directory, store KV blocks as chunks, look the prefix up,
 * load it into other blocks (another block table) layer by layer and check every byte; then
 * the error path.
 *
 * Build and run (the test loader/tests/ffi.rs does this against the cdylib cargo built):
 *   cc -I loader/include examples/c/kvfs_example.c -L target/debug/deps -lkvfs_loader \
 *      -Wl,-rpath,target/debug/deps -o kvfs_example && ./kvfs_example /tmp/kvfs-cache
 */
#include "kvfs.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The "tiny" preset: 2 layers, 2 KV heads, head dim 64, f16, 256-token chunks. */
#define LAYERS 2
#define ROW (2 * 64 * 2) /* bytes of one token of K (or V) */
#define BLOCK 16
#define TOKENS 520 /* two full chunks and 8 more tokens */
#define NBLOCKS 40

static int fail(const char *what, int code) {
    fprintf(stderr, "%s failed: code %d: %s\n", what, code, kvfs_last_error());
    return 1;
}

/* Address of the row of token position p, plane (0 = K, 1 = V), under a block table. */
static unsigned char *row(unsigned char *layer, const uint32_t *table, size_t p, int plane) {
    size_t slot = (size_t)table[p / BLOCK] * BLOCK + p % BLOCK;
    return layer + (size_t)plane * NBLOCKS * BLOCK * ROW + slot * ROW;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s <chunk directory>\n", argv[0]);
        return 2;
    }
    const size_t layer_bytes = (size_t)2 * NBLOCKS * BLOCK * ROW;
    unsigned char *src[LAYERS], *dst[LAYERS];
    uint32_t src_table[NBLOCKS], dst_table[NBLOCKS];
    uint32_t tokens[TOKENS];
    for (size_t i = 0; i < TOKENS; i++) tokens[i] = (uint32_t)(i * 7 + 3);
    for (uint32_t b = 0; b < NBLOCKS; b++) {
        src_table[b] = b;
        dst_table[b] = NBLOCKS - 1 - b;
    }
    for (int l = 0; l < LAYERS; l++) {
        src[l] = malloc(layer_bytes);
        dst[l] = calloc(1, layer_bytes);
        if (!src[l] || !dst[l]) return 3;
        for (size_t i = 0; i < layer_bytes; i++) src[l][i] = (unsigned char)(i * 13 + l);
    }

    kvfs_loader *loader = NULL;
    int rc = kvfs_open(argv[1], "tiny", NULL, (const uint8_t *)"tenant", 6, &loader);
    if (rc != KVFS_OK) return fail("kvfs_open", rc);
    size_t chunk = kvfs_chunk_tokens(loader);

    kvfs_blocks s = {(void *const *)src, LAYERS, layer_bytes, NBLOCKS, BLOCK, src_table, NBLOCKS};
    size_t written = 0;
    rc = kvfs_store(loader, tokens, TOKENS, &s, &written);
    if (rc != KVFS_OK) return fail("kvfs_store", rc);

    size_t hit = 0;
    rc = kvfs_lookup(loader, tokens, TOKENS, &hit);
    if (rc != KVFS_OK) return fail("kvfs_lookup", rc);
    if (hit != 2 * chunk) {
        fprintf(stderr, "lookup: hit %zu tokens, expected %zu\n", hit, 2 * chunk);
        return 1;
    }

    /* load a prefix that ends inside a block (500 tokens), layer by layer */
    kvfs_blocks d = {(void *const *)dst, LAYERS, layer_bytes, NBLOCKS, BLOCK, dst_table, NBLOCKS};
    kvfs_load_handle *h = NULL;
    rc = kvfs_load_start(loader, tokens, TOKENS, 0, 500, &d, &h);
    if (rc != KVFS_OK) return fail("kvfs_load_start", rc);
    for (size_t l = 0; l < LAYERS; l++) {
        rc = kvfs_load_wait_layer(h, l); /* an engine would run layer l's attention now */
        if (rc != KVFS_OK) return fail("kvfs_load_wait_layer", rc);
    }
    size_t loaded = 0;
    rc = kvfs_load_finish(h, &loaded);
    if (rc != KVFS_OK) return fail("kvfs_load_finish", rc);
    if (loaded != 500) {
        fprintf(stderr, "load: %zu tokens valid, expected 500\n", loaded);
        return 1;
    }
    for (int l = 0; l < LAYERS; l++)
        for (int plane = 0; plane < 2; plane++)
            for (size_t p = 0; p < 512; p++) {
                unsigned char *got = row(dst[l], dst_table, p, plane);
                if (p < 500) {
                    if (memcmp(got, row(src[l], src_table, p, plane), ROW) != 0) {
                        fprintf(stderr, "layer %d plane %d token %zu differs\n", l, plane, p);
                        return 1;
                    }
                } else {
                    for (int i = 0; i < ROW; i++)
                        if (got[i] != 0) {
                            fprintf(stderr, "token %zu was written past the range\n", p);
                            return 1;
                        }
                }
            }

    /* the synchronous form gives the same bytes */
    rc = kvfs_load(loader, tokens, TOKENS, 0, 500, &d, &loaded);
    if (rc != KVFS_OK || loaded != 500) return fail("kvfs_load", rc);

    /* errors: a range past the sequence, then an unknown preset */
    rc = kvfs_load(loader, tokens, TOKENS, 0, TOKENS + 1, &d, &loaded);
    if (rc != KVFS_ERR_INVALID || strlen(kvfs_last_error()) == 0) {
        fprintf(stderr, "expected KVFS_ERR_INVALID with a message, got %d\n", rc);
        return 1;
    }
    kvfs_close(loader);
    kvfs_loader *none = NULL;
    rc = kvfs_open(argv[1], "no-such-model", NULL, NULL, 0, &none);
    if (rc != KVFS_ERR_INVALID || none != NULL) {
        fprintf(stderr, "expected KVFS_ERR_INVALID for an unknown preset, got %d\n", rc);
        return 1;
    }
    printf("ok: stored %zu chunks, hit %zu tokens, loaded %zu tokens (%s)\n", written, hit,
           loaded, kvfs_last_error());
    for (int l = 0; l < LAYERS; l++) {
        free(src[l]);
        free(dst[l]);
    }
    return 0;
}
