// inference.cu — generates text from a checkpoint (filled in by the programs issue).
#include "tricycle.h"

#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
    if (argc > 1 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        printf("usage: ./inference [flags]\n(not yet implemented)\n");
        return 0;
    }
    fprintf(stderr, "inference: not yet implemented\n");
    return 1;
}
